"""Image and pixel thresholds: methods, false-alarm rates on synthetic scores, saved = applied."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import api
from anomnet.decisions.calibrate import load_labelled
from anomnet.decisions.calibration import (
    DEFAULT_PIXEL_FALSE_ALARM,
    Calibration,
    LabelledStatistics,
    ThresholdOptions,
    calibrate,
    pixel_quantile_threshold,
    tail_table,
)
from anomnet.decisions.postprocess import MaskPostprocess
from anomnet.errors import ConfigError, DatasetError

SMALL = {"image_size": 64, "batch_size": 4}


@pytest.mark.parametrize("dist", ["normal", "exponential"])
@pytest.mark.parametrize(("n", "alpha"), [(19, 0.05), (49, 0.02), (99, 0.01), (20, 0.01)])
def test_conformal_false_alarm_rate_over_many_seeds(dist: str, n: int, alpha: float) -> None:
    """Exchangeable good scores: the empirical false-alarm rate matches the supported rate <= max(alpha, 1/(n+1))."""
    rng = np.random.default_rng(n)
    draw = (lambda size: rng.normal(size=size)) if dist == "normal" else (lambda size: rng.exponential(size=size))
    rates, supported = [], set()
    for _ in range(2000):
        cal = calibrate(draw(n), alpha)
        supported.add(cal.achieved_false_alarm)
        rates.append(cal.decide(draw(50)).mean())
    (rate,) = supported
    assert rate <= max(alpha, 1 / (n + 1)) + 1e-12
    # E[false alarm] = (k+1)/(n+1) exactly; 2000 seeds x 50 images: standard error < 0.004
    assert abs(np.mean(rates) - rate) < 0.004


def test_p_values_are_reported_for_every_method() -> None:
    v = np.arange(1.0, 21.0)  # 20 validation scores
    for opts in (
        ThresholdOptions(),
        ThresholdOptions("mean-std", std_k=2.0),
        ThresholdOptions("fixed", image_value=15.5),
    ):
        cal = calibrate(v, options=opts)
        assert cal.p_values(np.array([21.0, 20.0, 0.0])).tolist() == pytest.approx([1 / 21, 2 / 21, 1.0])


def test_mean_std_and_fixed_thresholds() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0])
    cal = calibrate(v, options=ThresholdOptions("mean-std", std_k=2.0))
    assert cal.threshold == pytest.approx(2.5 + 2 * np.std(v, ddof=1))
    assert cal.achieved_false_alarm == pytest.approx(1 / 5)  # no validation score reaches it
    assert cal.score_mean == 2.5 and cal.score_std == pytest.approx(np.std(v, ddof=1))
    cal = calibrate(v, options=ThresholdOptions("fixed", image_value=2.5, max_false_alarm=0.1))
    assert cal.threshold == 2.5 and cal.decide(np.array([2.5, 2.4])).tolist() == [True, False]
    assert cal.achieved_false_alarm == pytest.approx(3 / 5) and "2 of 4" in cal.note
    with pytest.raises(ConfigError, match="fixed"):
        ThresholdOptions("fixed")
    with pytest.raises(ConfigError, match="unknown"):
        ThresholdOptions("median")
    with pytest.raises(ConfigError, match="labelled"):
        calibrate(v, options=ThresholdOptions("f1"))


def test_f1_thresholds_come_from_the_labelled_set() -> None:
    lab = LabelledStatistics.from_scores(
        "lab",
        np.array([0.1, 0.2, 0.9, 0.8, 0.15]),
        np.array([0, 0, 1, 1, 1]),
        pixel_f1=0.7,
        pixel_f1_threshold=0.33,
        masks=3,
    )
    # at 0.15: TP 3, FP 1 (0.2), FN 0 -> F1 6/7 beats 0.8 (TP 2, FN 1 -> F1 0.8)
    assert lab.image_f1_threshold == 0.15 and lab.image_f1 == pytest.approx(6 / 7)
    cal = calibrate(np.array([0.1, 0.2]), options=ThresholdOptions("f1", pixel_method="f1"), labelled=lab)
    assert cal.threshold == 0.15 and cal.pixel_threshold == 0.33
    # the labelled statistics are kept: f1 can be picked again later without the data
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))).rethreshold(ThresholdOptions("conformal"))
    assert again.threshold != 0.15
    assert again.rethreshold(ThresholdOptions("f1")).threshold == 0.15


def test_pixel_quantile_threshold_meets_its_false_alarm_target() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=200_000).astype(np.float32)
    tail = tail_table(pixels)
    for target in (1e-4, 1e-3, 1e-2, 0.05, 0.3):
        thr, share, note = pixel_quantile_threshold(tail, pixels.size, target)
        k = math.floor(target * pixels.size)
        above = int(np.count_nonzero(pixels >= thr))
        if k < 256:
            assert above == k  # exact at the densely stored ranks
        else:
            assert abs(above - k) <= 0.02 * k  # interpolated between stored ranks
        assert share == pytest.approx(k / pixels.size) and not note
        fresh = rng.normal(size=200_000).astype(np.float32)
        assert abs(np.mean(fresh >= thr) - target) < 5 * math.sqrt(target / 200_000) + 0.02 * target
    thr, share, note = pixel_quantile_threshold(tail, pixels.size, 1e-7)
    assert thr > pixels.max() and share == 0 and "at best 1/200000" in note


def test_calibration_changes_without_the_data_match_a_fresh_calibration() -> None:
    rng = np.random.default_rng(3)
    scores, pixels = rng.normal(size=30), rng.gamma(2.0, size=50_000)
    opts = ThresholdOptions("mean-std", std_k=2.5, pixel_false_alarm=0.01)
    fresh = calibrate(scores, map_values=pixels, options=opts)
    repicked = calibrate(scores, map_values=pixels).rethreshold(opts)
    assert fresh.to_dict() == repicked.to_dict()
    assert (
        calibrate(scores, map_values=pixels).pixel_false_alarm
        == DEFAULT_PIXEL_FALSE_ALARM
        == ThresholdOptions().pixel_false_alarm
    )


def test_saved_and_loaded_model_applies_the_same_thresholds(folder_dataset: Path, tmp_path: Path) -> None:
    post = {"closing": 2, "fill_holes": True, "min_area": 4}
    det = api.fit(
        "patchcore",
        folder_dataset,
        tmp_path / "m",
        settings=SMALL,
        progress=False,
        image_method="mean-std",
        std_k=2.0,
        pixel_false_alarm=0.02,
        **post,
    )
    cal = det.calibration
    assert (
        cal.image_method == "mean-std" and cal.pixel_false_alarm == 0.02 and cal.postprocess == MaskPostprocess(**post)
    )
    assert cal.pixel_count > 0 and math.isfinite(cal.pixel_threshold)
    loaded = api.load(tmp_path / "m")
    assert json.dumps(loaded.calibration.to_dict()) == json.dumps(cal.to_dict())
    images = [folder_dataset / "test"]
    a = api.predict(det, images, keep_maps=True)
    b = api.predict(tmp_path / "m", images, keep_maps=True)
    assert [r.defective for r in a] == [r.defective for r in b]
    assert [r.p_value for r in a] == [r.p_value for r in b]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert any(r.defect_pixels for r in a)
    for r in a:  # a defective image's mask: the map at the pixel threshold, post-processed, and its maximum
        at_threshold = MaskPostprocess(**post).apply(r.anomaly_map >= cal.pixel_threshold)
        if r.defective:
            assert np.all(r.mask >= at_threshold) and r.mask.flat[np.argmax(r.anomaly_map)]
        else:  # a good image has none
            assert not r.mask.any()


def test_recalibrating_a_saved_model(folder_dataset: Path, tmp_path: Path) -> None:
    det = api.fit("patchcore", folder_dataset, tmp_path / "m", settings=SMALL, progress=False)
    assert det.calibration.image_method == "conformal"
    api.calibrate(
        tmp_path / "m", image_method="fixed", image_value=123.0, pixel_false_alarm=0.05, min_area=10, progress=False
    )
    cal = api.load(tmp_path / "m").calibration
    assert cal.threshold == 123.0 and cal.pixel_false_alarm == 0.05 and cal.postprocess.min_area == 10
    assert not any(r.defective for r in api.predict(tmp_path / "m", [folder_dataset / "test"]))
    # F1 on a labelled set (the folder's test part: good/, blob/ and masks/) without refitting
    labelled = tmp_path / "labelled"
    (labelled / "masks").mkdir(parents=True)
    for sub in ("good", "blob"):
        (labelled / sub).mkdir()
        for f in (folder_dataset / "test" / sub).glob("*.png"):
            (labelled / sub / f.name).write_bytes(f.read_bytes())
    for f in (folder_dataset / "masks").glob("*.png"):
        (labelled / "masks" / f.name).write_bytes(f.read_bytes())
    samples = load_labelled(labelled)
    assert sum(s.label for s in samples) == 4 and all(s.mask_path for s in samples if s.label)
    det = api.calibrate(tmp_path / "m", labelled=labelled, image_method="f1", pixel_method="f1", progress=False)
    lab = det.calibration.labelled
    assert lab is not None and lab["defective"] == 4 and lab["masks"] == 4 and lab["image_f1"] == 1.0
    assert det.calibration.pixel_threshold == lab["pixel_f1_threshold"]
    assert all(
        r.defective == ("blob" in r.path) for r in api.predict(tmp_path / "m", [labelled / "good", labelled / "blob"])
    )
    with pytest.raises(ConfigError, match="unknown"):
        api.calibrate(tmp_path / "m", threshold_method="x", progress=False)


def test_labelled_set_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_labelled(tmp_path / "nope")
    (tmp_path / "only_good" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "only_good" / "good" / "a.png")
    with pytest.raises(DatasetError, match="no defective"):
        load_labelled(tmp_path / "only_good")


def test_calibrate_command_dry_run_and_recomputed_statistics(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    from anomnet.cli import EXIT_INPUT, EXIT_OK, main

    small = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]
    assert (
        main(["fit", "--data", str(folder_dataset), "--out", str(tmp_path / "m"), "--val-fraction", "0.25", *small])
        == EXIT_OK
    )
    assert "pixel threshold" in capsys.readouterr().out
    before = (tmp_path / "m" / "anomnet.json").read_text()
    assert (
        main(["calibrate", "--model-dir", str(tmp_path / "m"), "--image-threshold", "mean-std", "--dry-run", "--quiet"])
        == EXIT_OK
    )
    assert "mean + 3 std" in capsys.readouterr().out and (tmp_path / "m" / "anomnet.json").read_text() == before
    # recomputing the statistics from the same validation split gives the same calibration
    assert (
        main(
            [
                "calibrate",
                "--model-dir",
                str(tmp_path / "m"),
                "--data",
                str(folder_dataset),
                "--val-fraction",
                "0.25",
                "--quiet",
            ]
        )
        == EXIT_OK
    )
    assert json.loads((tmp_path / "m" / "anomnet.json").read_text())["calibration"] == json.loads(before)["calibration"]
    assert main(["calibrate", "--model-dir", str(tmp_path / "m"), "--image-threshold", "fixed"]) == EXIT_INPUT
    assert "image-value" in capsys.readouterr().err


def test_a_calibration_saved_before_pixel_thresholds_still_loads() -> None:
    old = {
        "validation_scores": [1.0, 2.0],
        "max_false_alarm": 0.01,
        "threshold": 2.5,
        "achieved_false_alarm": 0.33,
        "note": "",
        "map_low": 0.1,
        "map_high": 0.9,
    }
    cal = Calibration.from_dict(old)
    assert cal.threshold == 2.5 and cal.pixel_threshold == math.inf
    assert not cal.verdict(2.0, np.full((3, 3), 1e9))[1].any()  # a good image: no mask
    with pytest.raises(ConfigError, match="unknown calibration"):
        Calibration.from_dict({**old, "colour": 1})
