"""The postprocessing study of BENCHMARKS.md: pixel thresholds and mask post-processing on a test set.

Run from the repository root (the section's command)::

    python benchmarks/postprocess_study.py --data ../shared/datasets/mvtec_ad/bottle --models patchcore,anomnet \
        --work-dir runs/bench-pp --out benchmarks/postprocessing.json --markdown BENCHMARKS.md

One detector is fitted per model (default settings, calibrated as ``anomnet fit`` does), the test
maps are computed once at the masks' resolution, and then, for each post-processing variant:

* **SegF1 @cal**: pooled pixel F1 of the post-processed masks at the model's calibrated pixel
  threshold (good-pixel quantile, default target 1e-4) -- what ``anomnet predict`` produces;
* **SegF1 @F1-opt**: the same at the F1-optimal threshold of the raw maps on the test set (an
  oracle: a labelled validation set is how a user gets near it);
* **best SegF1**: the best pooled F1 of the post-processed masks over a grid of thresholds (oracle);
* **AU-PRO** of the post-processed map at the calibrated threshold: map values of pixels the
  cleaning removed are lowered to just below the threshold, of pixels it added raised to it
  (:func:`anomnet.decisions.postprocess.postprocess_map`); all other values are unchanged.

A second table compares pixel-threshold choices on the raw masks: quantile targets, and the
F1-optimal threshold tuned on one half of the test set (a stand-in for a labelled validation set,
stratified by defect type, seeded) and measured on the other half.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from anomnet.bench import command_line, write_outputs
from anomnet.decisions.postprocess import MaskPostprocess, SegmentationCounts, postprocess_map
from anomnet.errors import DatasetError

PRO_LIMITS = (0.3, 0.05)
QUANTILE_TARGETS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-9)  # 1e-9: just above every sampled good pixel
VARIANTS: tuple[tuple[str, MaskPostprocess], ...] = (
    ("none", MaskPostprocess()),
    ("closing r=8", MaskPostprocess(closing=8)),
    ("closing r=32", MaskPostprocess(closing=32)),
    ("fill holes", MaskPostprocess(fill_holes=True)),
    ("min area 1024", MaskPostprocess(min_area=1024)),
    ("min area 4096", MaskPostprocess(min_area=4096)),
    ("min area 16384", MaskPostprocess(min_area=16384)),
    ("closing r=8 + fill + min area 1024", MaskPostprocess(closing=8, fill_holes=True, min_area=1024)),
)


@dataclass
class TestMaps:
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    labels: np.ndarray
    defect_types: list[str]


def collect_maps(detector: Any, samples: list[Any], batch_size: int = 8) -> TestMaps:
    from anomnet.evaluation.evaluate import run_predictions

    maps, masks, labels, types = [], [], [], []
    for batch, pred in run_predictions(detector, samples, batch_size, with_masks=True):
        if batch.masks is None:
            raise DatasetError("the postprocessing study needs test masks")
        for amap, mask, s in zip(pred.maps, batch.masks, batch.samples):
            maps.append(amap.numpy().astype(np.float32, copy=False))
            masks.append(mask.numpy().astype(bool, copy=False))
            labels.append(s.label)
            types.append(s.defect_type)
    return TestMaps(maps, masks, np.asarray(labels), types)


def seg_f1(tm: TestMaps, threshold: float, post: MaskPostprocess, idx: list[int] | None = None) -> float:
    counts = SegmentationCounts()
    for i in idx if idx is not None else range(len(tm.maps)):
        raw = tm.maps[i] >= threshold
        counts.add(post.apply(raw) if post.enabled else raw, tm.masks[i])
    return counts.f1()


def raw_f1_threshold(tm: TestMaps, idx: list[int] | None = None) -> tuple[float, float]:
    from anomnet.evaluation.metrics import PixelMetricAccumulator

    acc = PixelMetricAccumulator()
    for i in idx if idx is not None else range(len(tm.maps)):
        acc.add(tm.maps[i], tm.masks[i])
    px = acc.compute(pro_limits=(0.3,))
    return px.f1_max, px.f1_threshold


def au_pro(tm: TestMaps, threshold: float, post: MaskPostprocess) -> dict[float, float]:
    from anomnet.evaluation.metrics import PixelMetricAccumulator

    acc = PixelMetricAccumulator()
    for amap, mask in zip(tm.maps, tm.masks):
        acc.add(postprocess_map(amap, threshold, post)[1], mask)
    return acc.compute(pro_limits=PRO_LIMITS).au_pro


def half_split(tm: TestMaps, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of two halves, every defect type (and good) split evenly, seeded."""
    rng = np.random.default_rng(seed)
    a: list[int] = []
    b: list[int] = []
    for t in sorted(set(tm.defect_types)):
        idx = [i for i, d in enumerate(tm.defect_types) if d == t]
        rng.shuffle(idx)
        a += idx[: len(idx) // 2]
        b += idx[len(idx) // 2 :]
    return sorted(a), sorted(b)


def study(detector: Any, tm: TestMaps, grid_size: int = 7) -> dict[str, Any]:
    cal = detector.calibration
    t_cal = cal.pixel_threshold
    f1_opt, t_opt = raw_f1_threshold(tm)
    # threshold grid for the best post-processed F1: around the raw optimum, in quantiles of the test maps
    grid = sorted({float(t_opt * f) for f in np.geomspace(0.7, 1.4, grid_size)} | {t_cal, t_opt})
    regions = _region_sizes(tm)
    rows = []
    for name, post in VARIANTS:
        t0 = time.perf_counter()
        at_cal = seg_f1(tm, t_cal, post)
        at_opt = seg_f1(tm, t_opt, post)
        best = max((seg_f1(tm, t, post), t) for t in grid)
        pro = au_pro(tm, t_cal, post)
        rows.append(
            {
                "variant": name,
                "settings": post.to_dict(),
                "seg_f1_cal": at_cal,
                "seg_f1_opt": at_opt,
                "best_seg_f1": best[0],
                "best_threshold": best[1],
                **{f"au_pro@{k:g}": v for k, v in pro.items()},
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"[bench] postprocessing {name}: SegF1 {at_cal:.4f} @cal, {at_opt:.4f} @opt, best {best[0]:.4f}; "
            f"AU-PRO {pro[0.3]:.4f} / {pro[0.05]:.4f}",
            file=sys.stderr,
        )
    thresholds = []
    for q in QUANTILE_TARGETS:
        t = cal.rethreshold(dataclasses.replace(cal.options, pixel_false_alarm=q)).pixel_threshold
        label = f"quantile {q:g}" if q > 1e-8 else "above every sampled good pixel"
        thresholds.append({"choice": label, "threshold": t, "seg_f1": seg_f1(tm, t, MaskPostprocess())})
    a, b = half_split(tm)
    f1_a, t_a = raw_f1_threshold(tm, a)
    thresholds.append(
        {
            "choice": "F1-optimal on half A, measured on half B",
            "threshold": t_a,
            "seg_f1": seg_f1(tm, t_a, MaskPostprocess(), b),
            "seg_f1_cal_on_b": seg_f1(tm, t_cal, MaskPostprocess(), b),
            "seg_f1_opt_on_b": raw_f1_threshold(tm, b)[0],
        }
    )
    thresholds.append({"choice": "F1-optimal on the whole test set (oracle)", "threshold": t_opt, "seg_f1": f1_opt})
    return {
        "pixel_threshold": t_cal,
        "pixel_false_alarm": cal.pixel_false_alarm,
        "f1_opt_threshold": t_opt,
        "pixel_count": cal.pixel_count,
        "pixel_max": cal.pixel_tail[0][1] if cal.pixel_tail else None,
        "rows": rows,
        "thresholds": thresholds,
        "regions": regions,
        "halves": [len(a), len(b)],
    }


def _region_sizes(tm: TestMaps) -> dict[str, float]:
    from scipy import ndimage

    sizes: list[int] = []
    for m in tm.masks:
        if m.any():
            lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
            sizes += np.bincount(lab.ravel())[1:].tolist()
    s = np.asarray(sizes)
    if s.size == 0:
        return {"count": 0}
    return {
        "count": int(s.size),
        "min": int(s.min()),
        "p5": float(np.percentile(s, 5)),
        "median": float(np.median(s)),
        "image_pixels": int(tm.masks[0].size),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Fit each model, study its test maps and return the report."""
    from anomnet import api
    from anomnet.data import load_dataset

    split = load_dataset(args.data, args.category)
    models = [m for m in (args.models or "patchcore").split(",") if m]
    results = []
    for model in models:
        print(f"[bench] postprocessing: fitting {model}", file=sys.stderr)
        t0 = time.perf_counter()
        det = api.fit(model, split, work / f"postprocessing-{model}", progress=False)
        fit_s = time.perf_counter() - t0
        tm = collect_maps(det, split.test)
        results.append({"model": model, "fit_s": fit_s, "test_images": len(tm.maps), **study(det, tm)})
        del tm
    return {
        "command": command_line(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "data": args.data,
        "models": results,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pixel thresholds and mask post-processing on a test set "
        "(the postprocessing section of BENCHMARKS.md)."
    )
    p.add_argument("--data", required=True, help="dataset folder with test masks (e.g. an MVTec AD category)")
    p.add_argument("--category", default=None, help="category inside an MVTec-style root folder")
    p.add_argument("--models", default="patchcore", help="comma-separated detectors (default patchcore)")
    p.add_argument("--out", required=True, metavar="JSON", help="the JSON report to write")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the section into this Markdown file")
    p.add_argument(
        "--section", default="postprocessing", help="section name in the Markdown file (default postprocessing)"
    )
    p.add_argument("--work-dir", default=None, help="folder for the fitted models (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.work_dir is not None:
        report = run(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="anomnet-pp-") as work:
            report = run(args, Path(work))
    text = render(report)
    write_outputs(args, report, text)
    print(text)
    return 0


def _p(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def render(r: dict[str, Any]) -> str:
    lines = [
        "## postprocessing",
        "",
        f"Produced by `{r['command']}` on {r['date']}. Data: `{r['data']}`. "
        "Definitions: `benchmarks/postprocess_study.py`,",
        "docs/decisions.md. SegF1 = pooled pixel F1 over all test images (percent); "
        "sizes in pixels of the 900 px masks.",
        "",
    ]
    for m in r["models"]:
        reg = m["regions"]
        lines += [
            f"### {m['model']} (default settings; fit {m['fit_s']:.0f} s; {m['test_images']} test images)",
            "",
            f"Calibrated pixel threshold {m['pixel_threshold']:.4g} "
            f"(good-pixel false-alarm target {m['pixel_false_alarm']:g}, "
            f"{m.get('pixel_count', 0)} sampled good validation pixels, "
            f"the highest {m.get('pixel_max', float('nan')):.4g}); "
            f"F1-optimal raw threshold on the test set {m['f1_opt_threshold']:.4g}. "
            f"Ground-truth regions: {reg.get('count')}, "
            f"smallest {reg.get('min')} px, 5th percentile {reg.get('p5', float('nan')):.0f} px, "
            f"median {reg.get('median', float('nan')):.0f} px.",
            "",
            "| post-processing | SegF1 @cal | SegF1 @F1-opt (oracle) | best SegF1 over thresholds (oracle) "
            "| AU-PRO@0.3 | AU-PRO@0.05 |",
            "|---|---|---|---|---|---|",
        ]
        for row in m["rows"]:
            lines.append(
                f"| {row['variant']} | {_p(row['seg_f1_cal'])} | {_p(row['seg_f1_opt'])} | {_p(row['best_seg_f1'])} | "
                f"{_p(row['au_pro@0.3'])} | {_p(row['au_pro@0.05'])} |"
            )
        lines += [
            "",
            "Pixel threshold choices, raw masks (no post-processing):",
            "",
            "| choice | threshold | SegF1 |",
            "|---|---|---|",
        ]
        for t in m["thresholds"]:
            extra = ""
            if "seg_f1_cal_on_b" in t:
                extra = (
                    f" (half B at the calibrated threshold: {_p(t['seg_f1_cal_on_b'])}; "
                    f"best possible on half B: {_p(t['seg_f1_opt_on_b'])})"
                )
            lines.append(f"| {t['choice']} | {t['threshold']:.4g} | {_p(t['seg_f1'])}{extra} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
