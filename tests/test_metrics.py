"""Tests of anomnet.evaluation.metrics against plain reference implementations and hand-computed cases."""

from __future__ import annotations

import math
from bisect import bisect
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.ndimage import label

from anomnet.errors import ConfigError
from anomnet.evaluation import metrics
from anomnet.evaluation.metrics import (
    PixelMetricAccumulator,
    PixelMetrics,
    f1_max,
    false_alarm_rate,
    image_auroc,
    precision_recall_f1,
)

# ---------------------------------------------------------------------------------------------
# Reference implementations, written plainly
# ---------------------------------------------------------------------------------------------


def ref_trapezoid(x, y, x_max=None):
    """MVTec AD's generic_util.trapezoid (without the non-finite filtering, never needed here)."""
    x = np.array(x, dtype=np.float64)
    y = np.array(y, dtype=np.float64)
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        mask = x <= x_max
        x = x[mask]
        y = y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def ref_compute_pro(anomaly_maps, ground_truth_maps):
    """MVTec AD's pro_curve_util.compute_pro, in float64 and for maps of differing sizes."""
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels = 0
    num_gt_regions = 0
    fp_changes, pro_changes = [], []
    for gt_map in ground_truth_maps:
        labeled, n_components = label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_change = np.zeros(gt_map.shape, dtype=np.float64)
        fp_change[ok_mask] = 1
        pro_change = np.zeros(gt_map.shape, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            region_size = np.sum(region_mask)
            pro_change[region_mask] = 1.0 / region_size
        fp_changes.append(fp_change.ravel())
        pro_changes.append(pro_change.ravel())

    anomaly_scores_flat = np.concatenate([np.asarray(a).ravel() for a in anomaly_maps])
    fp_changes_flat = np.concatenate(fp_changes)
    pro_changes_flat = np.concatenate(pro_changes)
    sort_idxs = np.argsort(anomaly_scores_flat)[::-1]
    anomaly_scores_sorted = anomaly_scores_flat[sort_idxs]
    fprs = np.cumsum(fp_changes_flat[sort_idxs]) / num_ok_pixels
    pros = np.cumsum(pro_changes_flat[sort_idxs]) / num_gt_regions
    keep_mask = np.append(np.diff(anomaly_scores_sorted) != 0, np.True_)
    fprs = fprs[keep_mask]
    pros = pros[keep_mask]
    np.clip(fprs, a_min=None, a_max=1.0, out=fprs)
    np.clip(pros, a_min=None, a_max=1.0, out=pros)
    zero = np.array([0.0])
    one = np.array([1.0])
    return np.concatenate((zero, fprs, one)), np.concatenate((zero, pros, one))


def ref_au_pro(maps, masks, limit):
    fprs, pros = ref_compute_pro(maps, masks)
    return ref_trapezoid(fprs, pros, x_max=limit) / limit


def ref_pixel_auroc(maps, masks):
    """ROC AUC by sorting, cumulative sums, one point per distinct score, trapezoids."""
    s = np.concatenate([np.asarray(a).ravel() for a in maps]).astype(np.float64)
    y = np.concatenate([np.asarray(m).ravel() for m in masks]).astype(bool)
    order = np.argsort(s)[::-1]
    s, y = s[order], y[order]
    tps = np.cumsum(y)
    fps = np.cumsum(~y)
    keep = np.append(np.diff(s) != 0, True)
    tpr = np.concatenate(([0.0], tps[keep] / y.sum(), [1.0]))
    fpr = np.concatenate(([0.0], fps[keep] / (~y).sum(), [1.0]))
    return float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * (fpr[1:] - fpr[:-1])))


def ref_f1_at(scores, labels, t):
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def ref_f1_max(scores, labels):
    """Best F1 over every distinct score used as the threshold, by brute force."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    return max(ref_f1_at(scores, labels, t) for t in np.unique(scores))


def ref_pairwise_auroc(scores, labels):
    """O(n^2): share of (anomalous, good) pairs ranked right, ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def accumulate(maps, masks, **kwargs) -> PixelMetricAccumulator:
    acc = PixelMetricAccumulator(**kwargs)
    for a, m in zip(maps, masks):
        acc.add(a, m)
    return acc


def full_masks(maps, masks):
    return [np.zeros(np.shape(a), dtype=bool) if m is None else np.asarray(m, dtype=bool) for a, m in zip(maps, masks)]


# ---------------------------------------------------------------------------------------------
# Property-based comparison with the references
# ---------------------------------------------------------------------------------------------

TIE_VALUES = np.array([-1.0, -0.0, 0.0, 0.25, 0.5, 1.0], dtype=np.float32)


@st.composite
def pixel_datasets(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n_images = draw(st.integers(1, 4))
    score_kind = draw(st.sampled_from(["few", "some", "continuous"]))
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n_images):
        h, w = (int(v) for v in rng.integers(5, 21, size=2))
        if score_kind == "few":
            amap = rng.choice(TIE_VALUES, size=(h, w))
        elif score_kind == "some":
            amap = (rng.integers(0, 12, size=(h, w)) / 4.0).astype(np.float32)
        else:
            amap = rng.normal(size=(h, w)).astype(np.float32)
        mask_kind = rng.choice(["none", "empty", "speckle", "boxes", "full"], p=[0.2, 0.1, 0.35, 0.3, 0.05])
        if mask_kind == "none":
            mask = None
        elif mask_kind == "empty":
            mask = np.zeros((h, w), dtype=bool)
        elif mask_kind == "full":
            mask = np.ones((h, w), dtype=bool)
        elif mask_kind == "speckle":
            mask = rng.random((h, w)) < rng.choice([0.05, 0.15, 0.4])
        else:
            mask = np.zeros((h, w), dtype=bool)
            for _ in range(int(rng.integers(1, 4))):
                y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
                mask[y0 : y0 + int(rng.integers(1, 5)), x0 : x0 + int(rng.integers(1, 5))] = True
            # Defects tend to score higher: makes the interesting part of the curve non-trivial.
            if score_kind != "few":
                amap = amap + mask.astype(np.float32) * np.float32(rng.integers(0, 3))
        maps.append(amap)
        masks.append(mask)
    return maps, masks


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=pixel_datasets(),
    random_limit=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    chunk_size=st.sampled_from([None, 1, 2, 3, 5, 17, 100]),
    point_pick=st.floats(min_value=0.0, max_value=1.0),
)
def test_pixel_metrics_match_reference(data, random_limit, chunk_size, point_pick):
    maps, masks = data
    gts = full_masks(maps, masks)
    n_pos = int(sum(g.sum() for g in gts))
    n_neg = int(sum(g.size for g in gts)) - n_pos
    # A limit that is exactly one of the curve's FPR values (no interpolation correction).
    exact_limit = max(1, round(point_pick * n_neg)) / n_neg if n_neg else 0.5
    limits = (0.3, 0.05, random_limit, exact_limit)

    res = accumulate(maps, masks).compute(limits, chunk_size=chunk_size)

    assert res.num_anomalous_pixels == n_pos
    assert res.num_normal_pixels == n_neg
    assert set(res.au_pro) == set(limits)
    if n_pos == 0:
        assert math.isnan(res.auroc) and math.isnan(res.f1_max) and math.isnan(res.f1_threshold)
        assert all(math.isnan(v) for v in res.au_pro.values())
        return
    scores = np.concatenate([a.ravel() for a in maps]).astype(np.float64)
    labels = np.concatenate([g.ravel() for g in gts])
    best = ref_f1_max(scores, labels)
    assert res.f1_max == pytest.approx(best, abs=1e-12)
    assert ref_f1_at(scores, labels, res.f1_threshold) == pytest.approx(best, abs=1e-12)
    if n_neg == 0:
        assert math.isnan(res.auroc)
        assert all(math.isnan(v) for v in res.au_pro.values())
        return
    assert res.auroc == pytest.approx(ref_pixel_auroc(maps, gts), abs=1e-9)
    for lim in limits:
        assert res.au_pro[lim] == pytest.approx(ref_au_pro(maps, gts, lim), abs=1e-9), lim


@settings(max_examples=150, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.7, 1.0]) | st.floats(-5, 5), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_image_metrics_match_brute_force(scores, seed):
    labels = np.random.default_rng(seed).random(len(scores)) < 0.4
    s = np.array(scores)
    if labels.all() or not labels.any():
        assert math.isnan(image_auroc(s, labels))
    else:
        assert image_auroc(s, labels) == pytest.approx(ref_pairwise_auroc(scores, labels), abs=1e-12)
    f1, t = f1_max(s, labels)
    if not labels.any():
        assert math.isnan(f1) and math.isnan(t)
        return
    best = ref_f1_max(s, labels)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert t in s
    assert precision_recall_f1(s, labels, t)[2] == pytest.approx(best, abs=1e-12)
    # The highest threshold among those reaching the best F1.
    assert all(ref_f1_at(s, labels, u) < best - 1e-12 for u in np.unique(s) if u > t)


@settings(max_examples=50, deadline=None)
@given(data=pixel_datasets(), chunk_size=st.integers(1, 40))
def test_chunking_and_blocks_do_not_change_results(data, chunk_size):
    maps, masks = data
    base = accumulate(maps, masks).compute((0.3, 0.05, 1.0))
    old = metrics.BLOCK_SIZE, metrics._MIN_BLOCK
    metrics.BLOCK_SIZE, metrics._MIN_BLOCK = 7, 3  # images split across many small blocks
    try:
        other = accumulate(maps, masks).compute((0.3, 0.05, 1.0), chunk_size=chunk_size)
    finally:
        metrics.BLOCK_SIZE, metrics._MIN_BLOCK = old
    assert_same(base, other, tol=1e-12)


def assert_same(a: PixelMetrics, b: PixelMetrics, tol: float) -> None:
    for x, y in [(a.auroc, b.auroc), (a.f1_max, b.f1_max)] + [(a.au_pro[k], b.au_pro[k]) for k in a.au_pro]:
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=tol)
    assert (math.isnan(a.f1_threshold) and math.isnan(b.f1_threshold)) or a.f1_threshold == b.f1_threshold
    assert (a.num_normal_pixels, a.num_anomalous_pixels, a.num_regions) == (
        b.num_normal_pixels,
        b.num_anomalous_pixels,
        b.num_regions,
    )


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------

# One 2x3 image; the defect is the middle column (scores 4 and 3), one region of 2 pixels.
# Normal pixels: 5, 3, 1, 0 (N = 4). Walking the thresholds downwards:
#   t=5: FP 1      -> (1/4, 0)
#   t=4: region 1/2 -> (1/4, 1/2)
#   t=3: FP 2 and region 2/2 (a tie of a normal and a defect pixel) -> (1/2, 1)
#   t=1: (3/4, 1); t=0: (1, 1); then the appended (1, 1).
HAND_MAP = np.array([[5, 4, 3], [1, 3, 0]], dtype=np.float32)
HAND_MASK = np.array([[0, 1, 0], [0, 1, 0]], dtype=bool)


def test_hand_case_limit_between_curve_points():
    # Limit 0.3 lies between FPR 1/4 and 1/2: area up to 1/4 is 0; the correction interpolates
    # PRO(0.3) = 1/2 + (1 - 1/2) * (0.3 - 1/4) / (1/4) = 3/5 and adds 1/2 * (3/5 + 1/2) * (1/20)
    # = 11/400. Divided by 0.3: 11/120.
    res = accumulate([HAND_MAP], [HAND_MASK]).compute((0.3,))
    assert res.au_pro[0.3] == pytest.approx(float(Fraction(11, 120)), abs=1e-12)
    assert res.au_pro[0.3] == pytest.approx(ref_au_pro([HAND_MAP], [HAND_MASK], 0.3), abs=1e-12)
    assert res.num_regions == 1


def test_hand_case_limit_on_a_curve_point():
    # Limit 1/2 is the FPR of a point: area = 1/2 * (1/2 + 1) * 1/4 = 3/16, divided by 1/2: 3/8.
    # Limit 1: 3/16 + 1/4 + 1/4 = 11/16.
    res = accumulate([HAND_MAP], [HAND_MASK]).compute((0.5, 1.0, 0.5))
    assert set(res.au_pro) == {0.5, 1.0}
    assert res.au_pro[0.5] == pytest.approx(float(Fraction(3, 8)), abs=1e-12)
    assert res.au_pro[1.0] == pytest.approx(float(Fraction(11, 16)), abs=1e-12)
    # AUROC by pairs: defect 4 beats 3, 1, 0 (3); defect 3 beats 1, 0 and ties 3 (2.5) -> 5.5 / 8.
    assert res.auroc == pytest.approx(11 / 16, abs=1e-12)
    # F1 at t=4: 2*1/(1+1+2) = 1/2; at t=3: 2*2/(2+2+2) = 2/3 (best); at t=1: 4/7; t=0: 1/2.
    assert res.f1_max == pytest.approx(2 / 3, abs=1e-12)
    assert res.f1_threshold == 3.0


def test_perfect_detector():
    rng = np.random.default_rng(0)
    maps, masks = [], []
    for _ in range(3):
        mask = np.zeros((9, 11), dtype=bool)
        mask[2:5, 3:7] = True
        mask[7, 9] = True
        amap = np.where(mask, 2.0 + rng.random((9, 11)), rng.random((9, 11))).astype(np.float32)
        maps.append(amap)
        masks.append(mask)
    maps.append(rng.random((9, 11)).astype(np.float32))
    masks.append(None)
    res = accumulate(maps, masks).compute((0.3, 0.05, 1.0))
    assert res.auroc == 1.0
    assert res.f1_max == 1.0
    assert res.num_regions == 6
    for v in res.au_pro.values():
        assert v == pytest.approx(1.0, abs=1e-12)


def test_inverted_detector():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    mask[4:, 4:] = True
    amap = np.where(mask, 0.0, 1.0 + np.arange(36).reshape(6, 6)).astype(np.float32)
    res = accumulate([amap], [mask]).compute((0.3, 1.0))
    assert res.auroc == 0.0
    assert res.au_pro[0.3] == 0.0
    assert res.au_pro[1.0] == 0.0
    # The best F1 is calling everything anomalous: 2*8 / (2*8 + 28) = 4/11.
    assert res.f1_max == pytest.approx(4 / 11, abs=1e-12)
    assert res.f1_threshold == 0.0


def test_good_image_only_adds_false_positives():
    # Defective image 1x2: defect score 2, normal score 1. Good image 1x2: scores 3 and 0.
    # Normal pixels pooled: 3, 1, 0 (N = 3). Curve: (0,0) (1/3,0) (1/3,1) (2/3,1) (1,1) (1,1).
    defective, defect_mask = np.array([[2, 1]], dtype=np.float32), np.array([[1, 0]], dtype=bool)
    good = np.array([[3, 0]], dtype=np.float32)
    alone = accumulate([defective], [defect_mask]).compute((0.5, 1.0))
    assert alone.au_pro[1.0] == 1.0 and alone.auroc == 1.0
    for good_mask in (None, np.zeros((1, 2), dtype=bool)):
        res = accumulate([defective, good], [defect_mask, good_mask]).compute((0.5, 1.0))
        assert res.num_normal_pixels == 3 and res.num_regions == 1
        # Limit 1/2: correction 1/2 * (1 + 1) * (1/2 - 1/3) = 1/6, divided by 1/2 -> 1/3.
        assert res.au_pro[0.5] == pytest.approx(1 / 3, abs=1e-12)
        assert res.au_pro[1.0] == pytest.approx(2 / 3, abs=1e-12)
        assert res.auroc == pytest.approx(2 / 3, abs=1e-12)


def test_diagonal_pixels_form_one_region():
    # Defect pixels (0,0), (0,1) and (1,2): (0,1) and (1,2) touch only diagonally. With 8-connectivity
    # they are ONE region of 3 pixels. Scores: defect (1,2)=9, (0,0)=(0,1)=2; normal (0,2)=5, rest 1.
    # Curve: (0,0) (0,1/3) (1/3,1/3) (1/3,1) (1,1) -> AU-PRO(1) = 1/9 + 2/3 = 7/9.
    # (With 4-connectivity it would be two regions and 5/6.)
    amap = np.array([[2, 2, 5], [1, 1, 9]], dtype=np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    res = accumulate([amap], [mask]).compute((1.0,))
    assert res.num_regions == 1
    assert res.au_pro[1.0] == pytest.approx(7 / 9, abs=1e-12)
    diag = accumulate([np.eye(3, dtype=np.float32)], [np.eye(3, dtype=bool)])
    assert diag.num_regions == 1


def test_ties_across_chunk_edges_and_signed_zero():
    # Long runs of equal scores, normal and defect pixels mixed, -0.0 and 0.0 equal.
    amap = np.array([[0.0, -0.0, 0.0, 1.0, 1.0, 1.0, 1.0], [-0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5]], dtype=np.float32)
    mask = np.array([[1, 0, 0, 1, 0, 1, 0], [0, 1, 0, 0, 1, 0, 0]], dtype=bool)
    limits = (0.05, 0.3, 0.5, 1.0)
    results = [accumulate([amap], [mask]).compute(limits, chunk_size=c) for c in (1, 2, 3, 4, 5, 13, None)]
    for other in results[1:]:
        assert_same(results[0], other, tol=1e-15)
    for lim in limits:
        assert results[0].au_pro[lim] == pytest.approx(ref_au_pro([amap], [mask], lim), abs=1e-12)
    assert results[0].auroc == pytest.approx(ref_pixel_auroc([amap], [mask]), abs=1e-12)
    assert results[0].f1_threshold in (0.0, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# Accumulator behaviour
# ---------------------------------------------------------------------------------------------


def test_capacity_torch_inputs_repeat_and_add_after_compute():
    rng = np.random.default_rng(3)
    maps = [rng.random((8, 10)).astype(np.float32) for _ in range(4)]
    masks = [rng.random((8, 10)) < 0.2 for _ in range(4)]
    ref = accumulate(maps, masks).compute((0.3,))
    for capacity in (0, 80, 160, 320, 1000):  # too small, exact, roomy
        assert_same(ref, accumulate(maps, masks, capacity=capacity).compute((0.3,)), tol=1e-12)
    acc = PixelMetricAccumulator()
    for a, m in zip(maps, masks):
        acc.add(torch.from_numpy(a), torch.from_numpy(m))
    assert_same(ref, acc.compute((0.3,)), tol=1e-12)
    assert_same(ref, acc.compute((0.3,)), tol=1e-12)  # computing twice
    half = accumulate(maps[:2], masks[:2])
    half.compute((0.3,))
    for a, m in zip(maps[2:], masks[2:]):
        half.add(a, m.astype(np.uint8))  # numeric masks: non-zero is anomalous
    assert_same(ref, half.compute((0.3,)), tol=1e-12)
    assert half.num_pixels == 320


def test_float64_maps_are_compared_at_float32_precision():
    a = np.array([[1.0, 1.0 + 1e-12, 0.0]])  # the first two collapse to one float32 value
    m = np.array([[1, 0, 0]], dtype=bool)
    res = accumulate([a], [m]).compute((1.0,))
    assert res.auroc == pytest.approx(0.75)


def test_no_defects_or_no_normal_pixels_give_nan():
    rng = np.random.default_rng(1)
    maps = [rng.random((5, 5)).astype(np.float32) for _ in range(2)]
    res = accumulate(maps, [None, np.zeros((5, 5), dtype=bool)]).compute((0.3, 0.05))
    assert math.isnan(res.auroc) and math.isnan(res.f1_max) and math.isnan(res.f1_threshold)
    assert all(math.isnan(v) for v in res.au_pro.values())
    res = accumulate(maps, [np.ones((5, 5), dtype=bool)] * 2).compute((0.3,))
    assert math.isnan(res.auroc) and math.isnan(res.au_pro[0.3])
    assert res.f1_max == 1.0  # F1 only needs anomalous pixels
    empty = PixelMetricAccumulator().compute()
    assert math.isnan(empty.auroc) and math.isnan(empty.au_pro[0.3])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_scores_are_rejected(bad):
    amap = np.zeros((4, 4), dtype=np.float64)
    amap[1, 2] = bad
    with pytest.raises(ConfigError, match="NaN or infinite"):
        PixelMetricAccumulator().add(amap, None)
    if np.isfinite(bad):
        return  # beyond float32 only: fine for image scores, which are float64
    with pytest.raises(ConfigError, match="NaN or infinite"):
        image_auroc([0.1, bad, 0.3], [0, 1, 1])
    with pytest.raises(ConfigError, match="NaN or infinite"):
        f1_max([0.1, bad], [0, 1])


def test_shape_errors():
    with pytest.raises(ConfigError, match=r"\(4, 5\).*\(4, 4\)"):
        PixelMetricAccumulator().add(np.zeros((4, 4), dtype=np.float32), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ConfigError, match="2-D"):
        PixelMetricAccumulator().add(np.zeros((1, 4, 4), dtype=np.float32), None)
    with pytest.raises(ConfigError, match="length"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ConfigError, match="1-D"):
        image_auroc(np.zeros((2, 2)), [0, 1, 0, 1])


def test_bad_labels_limits_and_settings():
    with pytest.raises(ConfigError, match="0 \\(good\\) or 1"):
        image_auroc([0.1, 0.2], [0, 2])
    acc = accumulate([HAND_MAP], [HAND_MASK])
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="limits"):
            acc.compute((0.3, bad))
    with pytest.raises(ConfigError, match="chunk_size"):
        acc.compute(chunk_size=0)
    with pytest.raises(ConfigError, match="capacity"):
        PixelMetricAccumulator(capacity=-1)
    with pytest.raises(ConfigError, match="threshold"):
        precision_recall_f1([0.1], [1], float("nan"))


# ---------------------------------------------------------------------------------------------
# Image level, small cases
# ---------------------------------------------------------------------------------------------


def test_image_metrics_small_cases():
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert image_auroc(torch.tensor([0.2, 0.9]), torch.tensor([False, True])) == 1.0
    assert math.isnan(image_auroc([0.1, 0.2], [1, 1]))
    assert precision_recall_f1([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35) == pytest.approx((2 / 3, 1.0, 0.8))
    assert precision_recall_f1([0.1, 0.2], [0, 0], 0.5) == (0.0, 0.0, 0.0)  # 0/0 is 0
    assert f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx((0.8, 0.35))
    assert f1_max([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == (1.0, 0.8)


def test_false_alarm_rate_counts_flagged_good_images_only() -> None:
    scores, labels = [0.1, 0.5, 0.9, 0.7, 0.2], [0, 0, 0, 1, 1]
    assert false_alarm_rate(scores, labels, 0.5) == pytest.approx(2 / 3)  # 0.5 and 0.9 flagged (>=)
    assert false_alarm_rate(scores, labels, 0.95) == 0.0
    assert math.isnan(false_alarm_rate([0.3], [1], 0.5))  # no good image
