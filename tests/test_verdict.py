"""One verdict per image (Calibration.verdict): a good image has no mask, a defective one holds its maximum."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import api
from anomnet.cli import EXIT_OK, main
from anomnet.decisions.calibration import Calibration
from anomnet.decisions.postprocess import MaskPostprocess, SegmentationCounts, peak_region
from anomnet.predict.scoring import ImageRef, score_refs


def _cal(**kw: object) -> Calibration:
    base: dict[str, object] = {
        "validation_scores": [0.1, 0.2, 0.3],
        "threshold": 1.0,
        "pixel_threshold": 10.0,
        "map_low": 0.0,
    }
    return Calibration(**{**base, **kw})  # type: ignore[arg-type]


def _two_bumps() -> np.ndarray:
    """A 32 x 32 map: a bump of height 4 at (8, 8) and a separate one of height 3 at (24, 24)."""
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    return 4.0 * np.exp(-((y - 8) ** 2 + (x - 8) ** 2) / 8.0) + 3.0 * np.exp(-((y - 24) ** 2 + (x - 24) ** 2) / 8.0)


def test_a_defective_image_below_the_pixel_threshold_gets_the_region_of_its_maximum() -> None:
    amap = _two_bumps()  # every pixel below the pixel threshold 10
    defective, mask = _cal().verdict(2.0, amap)
    assert defective and mask.any() and mask[8, 8]
    # the region at half the peak's height above the good level (0): map >= 2 around (8, 8), not the other bump
    assert np.array_equal(mask, peak_region(amap, 2.0))
    assert not mask[24, 24] and mask.sum() == np.count_nonzero(amap[:16, :16] >= 2.0)


def test_a_good_image_has_no_mask_whatever_its_pixels() -> None:
    amap = np.full((16, 16), 100.0, np.float32)  # far above the pixel threshold
    defective, mask = _cal().verdict(0.5, amap)
    assert not defective and mask.shape == amap.shape and not mask.any()
    assert not _cal().verdict(math.nan, amap)[0]  # a score that is no number is not a defect either


def test_a_defective_mask_that_holds_the_maximum_is_the_pixel_threshold_mask() -> None:
    amap = _two_bumps()
    defective, mask = _cal(pixel_threshold=2.5).verdict(2.0, amap)
    assert defective and np.array_equal(mask, amap >= 2.5)  # both bumps, nothing added


def test_post_processing_cannot_drop_the_maximum_of_a_defective_image() -> None:
    amap = np.zeros((16, 16), np.float32)
    amap[4, 4] = 5.0  # one pixel above the pixel threshold: min area 4 drops it
    cal = _cal(pixel_threshold=1.0, postprocess=MaskPostprocess(min_area=4))
    defective, mask = cal.verdict(2.0, amap)
    assert defective and mask[4, 4] and mask.sum() == 1


def test_the_level_lies_between_the_good_level_and_the_maximum() -> None:
    amap = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
    # good level 3, maximum 5: the region is map >= 4
    assert _cal(map_low=3.0).verdict(2.0, amap)[1].tolist() == [[False, False, False, True, True]]
    # a maximum below the good level still holds itself; a map of NaN has no region
    assert _cal(map_low=9.0).verdict(2.0, amap)[1].tolist() == [[False, False, False, False, True]]
    assert not _cal().verdict(2.0, np.full((2, 2), np.nan, np.float32))[1].any()


class _Scorer:
    """Score = the map's mean; map = the red channel."""

    batch_size = 4

    def __init__(self, cal: Calibration) -> None:
        self.calibration = cal

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = images[..., 0].astype(np.float32)
        return maps.mean(axis=(1, 2)).astype(np.float64), maps


def test_prediction_rows_follow_the_verdict_and_carry_the_threshold() -> None:
    cal = _cal(threshold=0.5, pixel_threshold=0.9, map_low=0.5)
    good = np.full((8, 8, 3), 0.2, np.float32)
    good[0, 0, 0] = 1.0  # one pixel above the pixel threshold, score below the image threshold
    bad = np.full((8, 8, 3), 0.6, np.float32)
    bad[5, 6, 0] = 0.8  # score above the image threshold, every pixel below the pixel threshold
    rows = score_refs(_Scorer(cal), [ImageRef("good", good), ImageRef("bad", bad)])
    assert [r.defective for r in rows] == [False, True]
    assert rows[0].defect_pixels == 0 and rows[0].regions == 0 and rows[0].boxes == []
    # its region: map >= 0.65, halfway from the good level 0.5 to its maximum 0.8
    assert rows[1].defect_pixels == 1 and rows[1].regions == 1 and rows[1].boxes == [[6, 5, 7, 6]]
    assert [r.record()["threshold"] for r in rows] == [0.5, 0.5]


SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


def _truth(path: str, data: Path, shape: tuple[int, ...]) -> np.ndarray:
    if "/blob/" not in path:
        return np.zeros(shape, bool)
    return np.array(Image.open(data / "masks" / Path(path).name)) > 0


@pytest.mark.parametrize("case", ["called good with pixels above", "called defective with none above"])
def test_cli_predict_api_predict_test_and_report_agree(case: str, folder_dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(model), *SMALL]) == EXIT_OK
    first = api.predict(model, [folder_dataset / "test"], keep_maps=True)
    scores = sorted(r.score for r in first)
    image_value = (scores[3] + scores[4]) / 2  # half the images called defective
    called = [r for r in first if r.score >= image_value]
    if case == "called good with pixels above":  # every image called good has a pixel at or above it
        pixel_value = min(float(r.anomaly_map.max()) for r in first if r not in called)
    else:  # no image called defective reaches it
        pixel_value = max(float(r.anomaly_map.max()) for r in called) + 1.0
    fixed = ["--image-threshold", "fixed", "--image-value", repr(image_value)]
    fixed += ["--pixel-threshold", "fixed", "--pixel-value", repr(pixel_value)]
    assert main(["calibrate", "--model-dir", str(model), *fixed, "--quiet"]) == EXIT_OK

    rows = api.predict(model, [folder_dataset / "test"], keep_maps=True)
    # the pixel threshold alone would contradict the image threshold here
    raw = [bool((r.anomaly_map >= pixel_value).any()) for r in rows]
    assert any(r.defective != a for r, a in zip(rows, raw))
    assert all(bool(r.mask.any()) == r.defective for r in rows)
    assert all(r.mask.flat[int(np.argmax(r.anomaly_map))] for r in rows if r.defective)

    out = tmp_path / "out"
    assert main(["predict", "--model-dir", str(model), str(folder_dataset / "test"), "--out", str(out), "--quiet"]) == 0
    by_path = {r.path: r for r in rows}
    table = list(csv.DictReader((out / "results.csv").open()))
    assert len(table) == len(rows)
    for line in table:
        r = by_path[line["path"]]
        assert line["defective"] == str(r.defective) and float(line["threshold"]) == image_value
        assert int(line["defect_pixels"]) == int(r.mask.sum()) and (r.defective or line["defect_pixels"] == "0")
    for rec in map(json.loads, (out / "results.jsonl").read_text().splitlines()):
        r = by_path[rec["path"]]
        assert rec["threshold"] == image_value and rec["defective"] == r.defective
        assert np.array_equal(np.array(Image.open(rec["outputs"]["mask"])) > 0, r.mask)

    seg = SegmentationCounts()
    for r in rows:
        seg.add(r.mask, _truth(r.path, folder_dataset, r.mask.shape))
    report = tmp_path / "report.html"
    result = api.test(model, folder_dataset, batch_size=4, progress=False, report=report)
    assert result.metrics["seg_f1"] == pytest.approx(seg.f1(), abs=1e-3)
    text = report.read_text()
    assert f"model folder</td><td>{model}<" in text
    assert "share of the good test images the model calls defective" in text  # false_alarm_rate in words
    assert "pixel F1 of the defect masks the model itself draws" in text  # seg_f1 in words
    assert "<h2>Operating points</h2>" in text and "test defects caught (recall)" in text
    caption = r"<figcaption>(\S+\.png) — truth: [^;]*; score \S+ \(threshold ([^)]+)\), p-value \S+, called (\w+)"
    shown = re.findall(caption, text)
    assert shown
    for path, threshold, decision in shown:
        assert decision == ("DEFECTIVE" if by_path[path].defective else "good")
        assert float(threshold) == pytest.approx(image_value, rel=1e-4)
