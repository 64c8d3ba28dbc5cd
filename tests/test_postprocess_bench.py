"""The post-processing study runs end to end on a tiny model and agrees with `anomnet test`."""

from __future__ import annotations

import math
from pathlib import Path

from anomnet import api
from anomnet.data import load_dataset
from anomnet.postprocess import MaskPostprocess
from anomnet.postprocess_bench import VARIANTS, collect_maps, half_split, render, seg_f1, study


def test_study_on_a_tiny_model(folder_dataset: Path) -> None:
    split = load_dataset(folder_dataset, val_fraction=0.25)
    det = api.fit("patchcore", split, None, settings={"image_size": 64, "batch_size": 4}, progress=False, pixel_false_alarm=0.01)
    tm = collect_maps(det, split.test)
    result = study(det, tm, grid_size=3)
    assert [r["variant"] for r in result["rows"]] == [name for name, _ in VARIANTS]
    none = result["rows"][0]
    # the study's SegF1 at the calibrated threshold is what `anomnet test` reports as seg_f1
    assert math.isclose(none["seg_f1_cal"], api.test(det, split, progress=False).metrics["seg_f1"])
    assert none["best_seg_f1"] >= none["seg_f1_opt"] - 1e-12  # the grid contains the raw optimum
    assert 0.0 < none["seg_f1_opt"] <= 1.0 and 0.0 < none["au_pro@0.3"] <= 1.0
    a, b = half_split(tm)
    assert sorted(a + b) == list(range(len(tm.maps))) and abs(len(a) - len(b)) <= 2
    assert seg_f1(tm, math.inf, MaskPostprocess()) == 0.0
    text = render({"command": "x", "date": "d", "data": "y", "models": [{"model": "patchcore", "fit_s": 1.0, "test_images": len(tm.maps), **result}]})
    assert "| closing r=8 + fill + min area 1024 |" in text and "half A" in text
