"""SegF1 before and after the one-verdict rule (docs/decisions.md, "One verdict per image").

Run from the repository root::

    python benchmarks/verdict_study.py --data ../shared/datasets/mvtec_ad/bottle \
        ../shared/datasets/piped/PA_FVN01_TL ../shared/datasets/piped/PA_BTN01_RL \
        ../shared/datasets/piped/PA_FLR01_TL --out benchmarks/verdict.json

For each dataset one detector is fitted at its defaults (as ``anomnet fit`` does, seed 0) and its test
maps are computed once at the masks' resolution. SegF1 (pixel F1 pooled over the test images) is then
counted for two mask rules at the model's own thresholds:

* **before**: every image's mask is ``map >= pixel threshold``, post-processed (whatever the decision);
* **after**: :meth:`anomnet.decisions.calibration.Calibration.verdict` -- no mask for an image called good, a
  defective image's mask holds at least the region of its maximum (what ``anomnet test`` counts now).

It also counts the images whose two verdicts disagreed before: called good with defect pixels, and
called defective with none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from anomnet import api
from anomnet.data import load_dataset
from anomnet.decisions.postprocess import SegmentationCounts
from anomnet.evaluation.evaluate import run_predictions


def study(data: str, model: str) -> dict[str, Any]:
    split = load_dataset(data)
    detector = api.fit(model, split, progress=False)
    cal = detector.calibration
    before, after = SegmentationCounts(), SegmentationCounts()
    good_with_pixels = defective_without = images = 0
    false_alarms = caught = good = bad = 0
    for batch, pred in run_predictions(detector, split.test, 8, with_masks=True):
        for i, sample in enumerate(batch.samples):
            score = float(pred.scores[i])
            called = score >= cal.threshold
            good, bad = good + int(sample.label == 0), bad + int(sample.label == 1)
            false_alarms += int(called and sample.label == 0)
            caught += int(called and sample.label == 1)
            if sample.label == 1 and sample.mask_path is None:
                continue  # no ground truth: image metrics only, as anomnet test counts
            amap = pred.maps[i].float().numpy()
            truth = batch.masks[i].numpy() if batch.masks is not None else np.zeros(amap.shape, bool)
            raw = amap >= cal.pixel_threshold
            old = cal.postprocess.apply(raw) if cal.postprocess.enabled else raw
            before.add(old, truth)
            after.add(cal.verdict(score, amap)[1], truth)
            images += 1
            good_with_pixels += int(not called and old.any())
            defective_without += int(called and not old.any())
    return {
        "data": data,
        "detector": model,
        "threshold": cal.threshold,
        "pixel_threshold": cal.pixel_threshold,
        "pixel_images": images,
        "false_alarms": f"{false_alarms} of {good}",
        "recall": f"{caught} of {bad}",
        "seg_f1_before": before.f1(),
        "seg_f1_after": after.f1(),
        "called_good_with_defect_pixels_before": good_with_pixels,
        "called_defective_without_defect_pixels_before": defective_without,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (MVTec-style category folders)")
    p.add_argument("--model", default="patchcore", help="detector (default patchcore)")
    p.add_argument("--out", required=True, help="JSON to write")
    args = p.parse_args(argv)
    rows = []
    for data in args.data:
        row = study(data, args.model)
        rows.append(row)
        print(
            f"{Path(data).name}: SegF1 {100 * row['seg_f1_before']:.2f} -> {100 * row['seg_f1_after']:.2f}; "
            f"called good with defect pixels before: {row['called_good_with_defect_pixels_before']}, called "
            f"defective with none: {row['called_defective_without_defect_pixels_before']} "
            f"({row['pixel_images']} images; false alarms {row['false_alarms']}, recall {row['recall']})",
            flush=True,
        )
    command = "python benchmarks/verdict_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(args.out).write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
