"""The curves behind the metrics: image ROC / PR, and the pixel ROC / PR / PRO curves the report plots."""

from __future__ import annotations

import numpy as np
import pytest

from anomnet.errors import ConfigError
from anomnet.evaluation.metrics import (
    PixelMetricAccumulator,
    f1_max,
    image_auroc,
    precision_recall_curve,
    roc_curve,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_roc_area_is_the_auroc_and_pr_peak_is_the_f1_max(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 8, 40).astype(float)  # many ties
    labels = (rng.random(40) < 0.4).astype(int)
    labels[:2] = [0, 1]
    fpr, tpr, thr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and thr[0] == np.inf
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(scores, labels), abs=1e-12)
    precision, recall, thr_pr = precision_recall_curve(scores, labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best, best_thr = f1_max(scores, labels)
    assert f1.max() == pytest.approx(best) and thr_pr[int(np.argmax(f1))] == best_thr


def test_image_curves_refuse_a_missing_class() -> None:
    with pytest.raises(ConfigError):
        roc_curve([0.1, 0.2], [0, 0])
    with pytest.raises(ConfigError):
        precision_recall_curve([0.1, 0.2], [0, 0])


def _data(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        amap = rng.random((40, 50)).astype(np.float32)
        amap[:5] = 0.25  # a run of equal scores
        mask = np.zeros((40, 50), dtype=bool)
        if i % 2:
            mask[5 + i : 15 + i, 10:20] = True
            mask[30:33, 40:44] = True
            amap[mask] += rng.uniform(0.2, 0.6)
        out.append((amap, mask))
    return out


def _accumulator(seed: int = 0) -> PixelMetricAccumulator:
    acc = PixelMetricAccumulator()
    for amap, mask in _data(seed):
        acc.add(amap, mask)
    return acc


def _full_roc(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every point of the pixel ROC curve, by brute force."""
    pairs = _data(seed)
    s = np.concatenate([a.ravel() for a, _ in pairs]).astype(np.float64)
    y = np.concatenate([m.ravel() for _, m in pairs])
    order = np.argsort(-s, kind="stable")
    tp, fp = np.cumsum(y[order]), np.cumsum(~y[order])
    end = np.append(s[order][:-1] != s[order][1:], True)
    return np.append(0.0, fp[end] / fp[-1]), np.append(0.0, tp[end] / tp[-1])


def test_pixel_curves_are_bounded_and_match_the_metrics() -> None:
    acc = _accumulator()
    n = 200
    px = acc.compute((0.3, 1.0), curve_points=n)
    c = px.curves
    assert c is not None
    assert len(c.fpr) <= 4 * n + 3 < acc.num_pixels
    assert (c.fpr[0], c.tpr[0], c.pro[0]) == (0.0, 0.0, 0.0)
    assert c.fpr[-1] == 1.0 and c.tpr[-1] == 1.0 and c.pro[-1] == pytest.approx(1.0)
    for arr in (c.fpr, c.tpr, c.pro):
        assert np.all(np.diff(arr) >= -1e-12)
    # Every kept point lies on the full curve; a gap of 1/n or more only joins neighbours on it.
    full_fpr, full_tpr = _full_roc(0)
    idx = [
        int(np.flatnonzero(np.isclose(full_fpr, f, atol=1e-12) & np.isclose(full_tpr, t, atol=1e-12))[0])
        for f, t in zip(c.fpr, c.tpr)
    ]
    big = (np.diff(c.fpr) >= 1.0 / n) | (np.diff(c.tpr) >= 1.0 / n)
    assert big.any() and np.all(np.diff(idx)[big] == 1)
    # Areas under the thinned curves agree with the exact metrics to the curve's resolution.
    assert np.trapezoid(c.tpr, c.fpr) == pytest.approx(px.auroc, abs=2.0 / n)
    assert np.trapezoid(c.pro, c.fpr) == pytest.approx(px.au_pro[1.0], abs=2.0 / n)
    inside = c.fpr <= 0.3
    x = np.append(c.fpr[inside], 0.3)
    y = np.append(c.pro[inside], np.interp(0.3, c.fpr, c.pro))
    assert np.trapezoid(y, x) / 0.3 == pytest.approx(px.au_pro[0.3], abs=4.0 / n)
    # Precision: exact at the end (all pixels called anomalous).
    assert c.precision[-1] == pytest.approx(px.num_anomalous_pixels / acc.num_pixels)


def test_pixel_curves_do_not_depend_on_the_chunking_and_are_optional() -> None:
    acc = _accumulator(1)
    whole = acc.compute(curve_points=50).curves
    chunked = acc.compute(curve_points=50, chunk_size=97).curves
    assert whole is not None and chunked is not None
    for a, b in zip(
        (whole.fpr, whole.tpr, whole.pro, whole.precision), (chunked.fpr, chunked.tpr, chunked.pro, chunked.precision)
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert acc.compute().curves is None
    with pytest.raises(ConfigError):
        acc.compute(curve_points=-1)
