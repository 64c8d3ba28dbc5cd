"""The paper's pixel thresholds: mean + k std of good validation pixels, and the per-object SegF1 search
(threshold jointly with closing, hole filling and minimum area on a labelled validation set)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from anomnet import api
from anomnet.decisions.calibration import Calibration, LabelledStatistics, ThresholdOptions, calibrate
from anomnet.decisions.postprocess import MaskPostprocess, SegmentationCounts
from anomnet.decisions.segsearch import candidate_settings, candidate_thresholds, search_segmentation
from anomnet.errors import ConfigError

SMALL = {"image_size": 64, "batch_size": 4}


# -- mean + k std -------------------------------------------------------------------------------


def test_mean_std_pixel_threshold_of_the_good_validation_pixels() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.gamma(2.0, size=40_000).astype(np.float32)
    cal = calibrate(rng.normal(size=10), map_values=pixels, options=ThresholdOptions(pixel_method="mean-std"))
    expected = float(np.mean(pixels, dtype=np.float64) + 3.0 * np.std(pixels, dtype=np.float64))
    assert cal.pixel_threshold == pytest.approx(expected, rel=1e-9)
    assert cal.pixel_method == "mean-std" and cal.pixel_std_k == 3.0
    # the share above it is estimated from the stored tail, as for every method
    assert cal.pixel_achieved_false_alarm == pytest.approx(np.mean(pixels >= expected), rel=0.05)
    assert "mean + 3 std of 40000 good validation pixels" in "\n".join(cal.summary())
    # another k later, without the data; saved and loaded it stays the same
    k4 = Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))).rethreshold(
        ThresholdOptions(pixel_method="mean-std", pixel_std_k=4.0)
    )
    assert k4.pixel_threshold == pytest.approx(np.mean(pixels, dtype=np.float64) + 4 * np.std(pixels, dtype=np.float64))
    assert k4.rethreshold(ThresholdOptions()).pixel_method == "quantile"
    with pytest.raises(ConfigError, match="pixel_std_k"):
        ThresholdOptions(pixel_method="mean-std", pixel_std_k=math.nan)


def test_mean_std_pixel_threshold_needs_stored_pixel_statistics() -> None:
    old = calibrate(np.arange(5.0), map_values=np.arange(100.0)).to_dict()
    del old["pixel_mean"], old["pixel_std"]  # a model saved before these statistics existed
    cal = Calibration.from_dict(old)
    assert math.isnan(cal.pixel_mean)
    with pytest.raises(ConfigError, match="calibrate --data"):
        cal.rethreshold(ThresholdOptions(pixel_method="mean-std"))


def test_fit_and_calibrate_with_the_mean_std_pixel_threshold(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    from anomnet.cli import EXIT_OK, main

    small = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]
    args = ["fit", "--data", str(folder_dataset), "--out", str(tmp_path / "m"), "--pixel-threshold", "mean-std"]
    assert main([*args, *small]) == EXIT_OK
    assert "mean + 3 std" in capsys.readouterr().out
    cal = api.load(tmp_path / "m").calibration
    assert cal.pixel_threshold == pytest.approx(cal.pixel_mean + 3 * cal.pixel_std)
    assert main(["calibrate", "--model-dir", str(tmp_path / "m"), "--pixel-std-k", "5", "--quiet"]) == EXIT_OK
    again = api.load(tmp_path / "m").calibration
    assert again.pixel_method == "mean-std" and again.pixel_std_k == 5.0
    assert again.pixel_threshold == pytest.approx(cal.pixel_mean + 5 * cal.pixel_std)


# -- the joint SegF1 search ---------------------------------------------------------------------


def _seg_f1(maps: list[np.ndarray], masks: list[np.ndarray], threshold: float, post: MaskPostprocess) -> float:
    counts = SegmentationCounts()
    for amap, mask in zip(maps, masks):
        counts.add(post.apply(amap >= threshold), mask)
    return counts.f1()


def test_search_fills_a_ring_whose_inside_is_the_defect() -> None:
    y, x = np.mgrid[0:40, 0:40]
    r = np.hypot(y - 20, x - 20)
    truth = r <= 10
    amap = np.where((r >= 7) & (r <= 10), 1.0, 0.0).astype(np.float32)  # the map lights up the rim only
    found = search_segmentation([amap], [truth], 0.5, thresholds=[0.5], radii=[0], areas=[0])
    assert found.postprocess == MaskPostprocess(fill_holes=True) and found.f1 == 1.0
    assert found.candidates == 2  # fill off / on
    assert _seg_f1([amap], [truth], 0.5, MaskPostprocess()) < 1.0


def test_search_scores_no_mask_on_an_image_called_good() -> None:
    """The search scores masks as the verdict makes them: an image called good predicts no pixel."""
    truth = np.zeros((30, 30), bool)
    truth[5:15, 5:15] = True
    defective = np.where(truth, 0.8, 0.0).astype(np.float32)
    good = np.zeros((30, 30), np.float32)
    good[20:28, 20:28] = 0.9  # a bright false blob on an image the image threshold calls good
    maps, masks = [defective, good], [truth, np.zeros_like(truth)]
    found = search_segmentation(maps, masks, 0.7, thresholds=[0.7, 0.85], radii=[0], areas=[0], called_good=[0, 1])
    assert found.threshold == 0.7 and found.f1 == 1.0
    ungated = search_segmentation(maps, masks, 0.7, thresholds=[0.7, 0.85], radii=[0], areas=[0])
    assert ungated.f1 == pytest.approx(200 / 264)  # TP 100, FP 64: the good image's blob counted
    missed = search_segmentation(maps, masks, 0.7, thresholds=[0.7], radii=[0], areas=[0], called_good=[1, 1])
    assert missed.f1 == 0.0  # the defective image called good: all its pixels missed
    with pytest.raises(ConfigError, match="a verdict per map"):
        search_segmentation(maps, masks, 0.7, called_good=[0])


def test_search_drops_speckle_with_a_minimum_area_and_keeps_the_defect() -> None:
    truth = np.zeros((50, 50), bool)
    truth[10:20, 10:20] = True  # 100 px
    amap = truth.astype(np.float32)
    amap[[30, 40, 45], [30, 5, 45]] = 1.0  # three single false pixels
    found = search_segmentation([amap], [truth], 0.5, thresholds=[0.5], radii=[0], areas=[0, 4, 200])
    assert found.postprocess == MaskPostprocess(min_area=4) and found.f1 == 1.0
    # hand count without it: TP 100, FP 3 -> 200 / 203
    assert _seg_f1([amap], [truth], 0.5, MaskPostprocess()) == pytest.approx(200 / 203)


def test_search_closes_a_gap_and_prefers_no_post_processing_on_ties() -> None:
    truth = np.zeros((30, 30), bool)
    truth[10:20, 5:25] = True
    amap = truth.astype(np.float32)
    amap[10:20, 14:16] = 0.0  # a 2-px gap splits the predicted defect
    found = search_segmentation([amap], [truth], 0.5, thresholds=[0.5], radii=[0, 2, 3], areas=[0])
    assert found.postprocess.closing == 2  # the smaller radius that closes it (3 does no better)
    assert found.f1 == pytest.approx(_seg_f1([amap], [truth], 0.5, MaskPostprocess(closing=2)))
    assert found.f1 > 0.98 > _seg_f1([amap], [truth], 0.5, MaskPostprocess()) == pytest.approx(360 / 380)
    perfect = truth.astype(np.float32)
    found = search_segmentation([perfect], [truth], 0.5, thresholds=[0.5], radii=[0, 2], areas=[0, 4])
    assert found.postprocess == MaskPostprocess() and found.f1 == 1.0  # nothing to gain: nothing switched on


def test_search_picks_the_threshold_and_pools_over_images() -> None:
    truth = np.zeros((20, 20), bool)
    truth[5:10, 5:10] = True  # 25 px
    amap = np.where(truth, 0.8, 0.1).astype(np.float32)
    amap[15:17, 15:17] = 0.6  # 4 false pixels between the two candidate thresholds
    good = np.full((20, 20), 0.65, np.float32)  # a good image whose every pixel is above 0.6
    found = search_segmentation([amap, good], [truth, np.zeros_like(truth)], 0.5, thresholds=[0.5, 0.7], radii=[0])
    assert found.threshold == 0.7 and found.f1 == 1.0
    # at 0.5: TP 25, FP 4 + 400 -> F1 = 50 / (50 + 404)
    assert _seg_f1([amap, good], [truth, np.zeros_like(truth)], 0.5, MaskPostprocess()) == pytest.approx(50 / 454)


def test_search_candidates_scale_with_the_images() -> None:
    radii, areas = candidate_settings([(900, 900), (900, 900)])
    assert radii == [0, 2, 4, 9, 18] and areas == [0, 8, 81, 810]
    rng = np.random.default_rng(1)
    maps = [rng.random((64, 64)).astype(np.float32) for _ in range(3)]
    values = candidate_thresholds(maps, 0.9)
    assert values[0] == 0.9 and len(values) == len(set(values)) > 5
    pooled = np.concatenate([m.ravel() for m in maps])
    shares = sorted(np.mean(pooled >= v) for v in values[1:])
    assert shares[0] == pytest.approx(0.1 / 4, rel=0.1) and shares[-1] == pytest.approx(0.4, rel=0.1)
    with pytest.raises(ConfigError, match="defect pixels"):
        search_segmentation(maps, [np.zeros((64, 64), bool)] * 3, 0.5)
    with pytest.raises(ConfigError, match="differs"):
        search_segmentation(maps[:1], [np.zeros((8, 8), bool)], 0.5)


def test_segf1_method_uses_the_stored_search() -> None:
    lab = LabelledStatistics(
        "lab", 6, 3, masks=3, pixel_f1=0.5, pixel_f1_threshold=0.4, search_f1=0.7, search_threshold=0.45,
        search_closing=3, search_fill_holes=True, search_min_area=10, search_candidates=90,
    )  # fmt: skip
    cal = calibrate(np.arange(4.0), options=ThresholdOptions(pixel_method="segf1"), labelled=lab)
    assert cal.pixel_threshold == 0.45 and cal.postprocess == MaskPostprocess(3, True, 10)
    assert "SegF1 0.700" in cal.pixel_note and "90" in cal.pixel_note
    loaded = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    repicked = loaded.rethreshold(ThresholdOptions(pixel_method="segf1"))
    assert json.dumps(repicked.to_dict()) == json.dumps(cal.to_dict())
    with pytest.raises(ConfigError, match="segf1"):
        calibrate(np.arange(4.0), options=ThresholdOptions(pixel_method="segf1"))
    no_search = LabelledStatistics("lab", 6, 3, masks=3, pixel_f1=0.5, pixel_f1_threshold=0.4)
    with pytest.raises(ConfigError, match="labelled"):
        calibrate(np.arange(4.0), options=ThresholdOptions(pixel_method="segf1"), labelled=no_search)


def test_fit_with_the_segf1_search_on_a_labelled_set(folder_dataset: Path, tmp_path: Path) -> None:
    from anomnet.decisions.calibrate import load_labelled

    labelled = load_labelled(folder_dataset)  # its test split: good/, blob/ and the masks
    det = api.fit(
        "patchcore",
        folder_dataset,
        tmp_path / "m",
        settings=SMALL,
        progress=False,
        labelled=labelled,
        pixel_method="segf1",
    )
    cal = det.calibration
    lab = cal.labelled
    assert lab is not None and lab["search_candidates"] == 9 * 2 * 2 * 2 and lab["masks"] == 4
    assert cal.pixel_threshold == lab["search_threshold"]
    assert cal.postprocess == MaskPostprocess(lab["search_closing"], lab["search_fill_holes"], lab["search_min_area"])
    # the recorded SegF1 is what the chosen settings give on the labelled maps under the image threshold
    # (an image called good has no mask), and it is the best of the grid
    from anomnet.evaluation.evaluate import run_predictions

    maps, masks = [], []
    for batch, pred in run_predictions(det, labelled, 4, with_masks=True):
        assert batch.masks is not None
        maps += [
            m.numpy() if s >= cal.threshold else np.full_like(m.numpy(), -np.inf)
            for m, s in zip(pred.maps, pred.scores)
        ]
        masks += [m.numpy() for m in batch.masks]
    assert any(np.isinf(m).all() for m in maps)  # some labelled images are called good
    assert _seg_f1(maps, masks, cal.pixel_threshold, cal.postprocess) == pytest.approx(lab["search_f1"])
    assert lab["search_f1"] >= _seg_f1(maps, masks, lab["pixel_f1_threshold"], MaskPostprocess()) - 1e-12
    # picked again later from the stored search, without the images
    api.calibrate(tmp_path / "m", pixel_method="quantile", progress=False)
    again = api.calibrate(tmp_path / "m", pixel_method="segf1", progress=False)
    assert again.calibration.pixel_threshold == cal.pixel_threshold


def test_labelled_search_uses_the_image_threshold_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """labelled_statistics scores the segf1 search under the image threshold its ``search`` callable gives."""
    import torch

    from anomnet.data import Sample
    from anomnet.decisions import calibrate as calibrate_mod
    from anomnet.detectors.base import Prediction

    truth = np.zeros((30, 30), bool)
    truth[5:15, 5:15] = True
    defective = np.where(truth, 0.8, 0.0).astype(np.float32)
    good = np.zeros((30, 30), np.float32)
    good[20:28, 20:28] = 0.9  # a bright false blob on the good image, whose image score is low
    samples = [Sample(Path("bad.png"), 1, Path("bad_mask.png"), "blob"), Sample(Path("good.png"), 0)]

    class FakeBatch:
        def __init__(self) -> None:
            self.samples = samples
            self.masks = torch.from_numpy(np.stack([truth, np.zeros_like(truth)]))

    def fake_run(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        yield FakeBatch(), Prediction(torch.tensor([0.9, 0.1]), torch.from_numpy(np.stack([defective, good])))

    monkeypatch.setattr(calibrate_mod, "run_predictions", fake_run)
    gated = calibrate_mod.labelled_statistics(None, samples, "fake", search=lambda lab: 0.5)  # type: ignore[arg-type]
    ungated = calibrate_mod.labelled_statistics(None, samples, "fake", search=lambda lab: -math.inf)  # type: ignore[arg-type]
    assert gated.search_f1 == 1.0  # the good image predicts nothing: the defect alone decides
    assert ungated.search_f1 < 0.9  # every image masked: the good image's blob costs false pixels
