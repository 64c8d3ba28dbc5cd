"""Stretch or pad? The ``aspect`` setting measured on images that are not square.

Writes ``benchmarks/aspect.json`` and the ``aspect`` section of BENCHMARKS.md::

    python benchmarks/aspect_study.py --models patchcore,anomnet --markdown BENCHMARKS.md   # the recorded run
    python benchmarks/aspect_study.py --datasets PA_BDP01_TL --kinds strips --out /tmp/a.json   # a quick check

Datasets: stress variants (benchmarks/stress.py) of the eight PIPED classes and of MVTec AD bottle,
written under ``runs/stress`` on first use: ``crops`` (every image cut to a random window of 40-100 %
of each side, so the images differ in size and aspect ratio) and ``strips`` (every image cut to a
full-height window of 40 % of its width: all 2.5 : 1, KolektorSDD's shape); KolektorSDD itself where
``../shared/datasets`` holds it. Per dataset, detector and ``aspect`` (``stretch``, ``pad``) the
detector is fitted at its defaults otherwise on every good training image (no calibration: the
metrics here need none) and its test split scored: image AUROC, pixel AUROC, AU-PRO@0.3. Each
dataset's training images are also described by their long/short side ratios (read from the
headers), the quantity ``aspect=auto`` decides on. The run resumes: rows already in the JSON (same
dataset, detector, aspect) are kept, and every command that added rows is listed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PIPED_CLASSES  # noqa: E402  (the suite's PIPED classes)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
SECTION = "aspect"
ASPECTS = ("stretch", "pad")
MODELS = ("patchcore", "anomnet")
KINDS = ("crops", "strips")
METRICS = (("image_auroc", "img AUROC"), ("pixel_auroc", "px AUROC"), ("au_pro@0.3", "AU-PRO@0.3"))


def datasets(runs: Path, kinds: list[str], names: set[str]) -> dict[str, Path]:
    """Name -> MVTec-layout folder: the variants (written on first use), KolektorSDD if present."""
    import stress

    sources = {"bottle": SHARED / "mvtec_ad" / "bottle", **{c: SHARED / "piped" / c for c in PIPED_CLASSES}}
    out = {
        f"{name}-{kind}": stress.make_variant(src, kind, runs / "stress")
        for kind in kinds
        for name, src in sources.items()
        if "all" in names or name in names
    }
    if (SHARED / "kolektorsdd").is_dir():
        out["kolektorsdd"] = SHARED / "kolektorsdd"
    return out


def side_ratios(folder: Path) -> dict[str, float]:
    """Long/short side ratios of the good training images, from their headers."""
    from anomnet.imageio import image_size, list_images

    ratios = sorted(max(h, w) / min(h, w) for h, w in map(image_size, list_images(folder / "train" / "good")))
    return {
        "images": len(ratios),
        "median": statistics.median(ratios),
        "max": ratios[-1],
        "share_over_1.1": sum(r > 1.1 for r in ratios) / len(ratios),
    }


def run_row(path: Path, model: str, aspect: str) -> dict[str, Any]:
    from anomnet import api
    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector

    split = load_dataset(path)
    det = create_detector(model, {"aspect": aspect})
    start = time.perf_counter()
    det.fit(list(split.train), list(split.validation), progress=False)
    fit_s = time.perf_counter() - start
    metrics = api.test(det, split, progress=False).metrics
    return {"fit_s": fit_s, "metrics": {k: metrics.get(k) for k, _ in METRICS}}


def _fmt(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def render(report: dict[str, Any]) -> str:
    from anomnet.transforms import PAD_RATIO

    rows = report["rows"]
    commands = " and ".join(f"`{c}`" for c in report.get("commands") or [report["command"]])
    lines = [
        "## aspect: stretch or pad on images that are not square",
        "",
        f"Command: {commands} (started {report['started']}; rows kept across resumed runs; {report['cpu']}, "
        f"{report['cpu_cores']} cores shared with other benchmarks, so fit times are under load; "
        f"torch {report['torch']}).",
        "",
        "Each detector at its defaults but `aspect` (forced to `stretch` and to `pad`), fitted on every good "
        "training image of a stress variant (benchmarks/stress.py) and tested on its test split: `crops`, each "
        "image cut to a random window of 40-100 % of each side (shapes vary); `strips`, each image cut to a "
        "full-height window of 40 % of its width (all 2.5 : 1, KolektorSDD's shape). Side ratio: long / short "
        "side of the training images (median, max), as `aspect=auto` reads them; auto: what it picks "
        f"(`pad` above a median of {PAD_RATIO}).",
        "",
        "| dataset | side ratio median / max | auto | detector | "
        + " | ".join(f"{label} stretch / pad" for _, label in METRICS)
        + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    means: dict[tuple[str, str], dict[str, list[float]]] = {}
    for ds, stats in report["datasets"].items():
        auto = "pad" if stats["median"] > PAD_RATIO else "stretch"
        for model in report["models"]:
            got = {r["aspect"]: r for r in rows if r["dataset"] == ds and r["model"] == model}
            if set(got) != set(ASPECTS):
                continue
            cells = []
            for key, _ in METRICS:
                s, p = got["stretch"]["metrics"].get(key), got["pad"]["metrics"].get(key)
                cells.append(f"{_fmt(s)} / {_fmt(p)}")
                if ds.startswith("PA_") and s is not None and p is not None:
                    group = means.setdefault((ds.rpartition("-")[2], model), {})
                    group.setdefault(f"{key}:stretch", []).append(s)
                    group.setdefault(f"{key}:pad", []).append(p)
            ratio = f"{stats['median']:.2f} / {stats['max']:.2f}"
            lines.append(f"| {ds} | {ratio} | {auto} | {model} | " + " | ".join(cells) + " |")
    for (kind, model), vals in sorted(means.items()):
        n = len(vals.get("image_auroc:stretch", []))
        cells = [
            f"{_fmt(statistics.mean(vals[f'{k}:stretch']))} / {_fmt(statistics.mean(vals[f'{k}:pad']))}"
            for k, _ in METRICS
        ]
        lines.append(f"| PIPED-{kind} mean ({n} classes) | | | {model} | " + " | ".join(cells) + " |")
    lines += ["", f"Fit time, mean per row: {_fit_times(rows)} (under load).", ""]
    return "\n".join(lines) + "\n"


def _fit_times(rows: list[dict[str, Any]]) -> str:
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for aspect in ASPECTS:
            sel = [r["fit_s"] for r in rows if r["model"] == model and r["aspect"] == aspect]
            if sel:
                parts.append(f"{model} {aspect} {statistics.mean(sel):.1f} s")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure aspect=stretch against aspect=pad on non-square images.")
    p.add_argument("--models", default="patchcore", help=f"comma-separated detectors ({', '.join(MODELS)})")
    p.add_argument("--datasets", default="all", help="comma-separated source names (bottle, PIPED classes), or all")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated stress variants ({', '.join(KINDS)})")
    p.add_argument("--anomnet-datasets", default="piped", help="where anomnet runs: piped (the PIPED classes) or all")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "aspect.json"), help="the JSON report")
    p.add_argument("--markdown", default=None, help="also write the 'aspect' section of this file")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder for the stress variants")
    p.add_argument("--render", action="store_true", help="only write the table of the JSON report")
    a = p.parse_args(argv)
    command = "python benchmarks/aspect_study.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    print(f"command: {command}", flush=True)
    out = Path(a.out)
    from anomnet.bench import _cpu_name, write_section
    from anomnet.imageio import atomic_write_text

    if a.render:
        text = render(json.loads(out.read_text()))
        print(text)
        if a.markdown:
            write_section(Path(a.markdown), SECTION, text)
        return 0
    import torch

    models = [m for m in a.models.split(",") if m]
    if unknown := [m for m in models if m not in MODELS]:
        raise SystemExit(f"aspect_study: unknown detector(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    kinds = [k for k in a.kinds.split(",") if k]
    if unknown := [k for k in kinds if k not in KINDS]:
        raise SystemExit(f"aspect_study: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    chosen = datasets(Path(a.runs), kinds, set(a.datasets.split(",")))
    old: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    rows: list[dict[str, Any]] = list(old.get("rows", []))
    earlier = old.get("commands", [old["command"]] if "command" in old else [])
    report: dict[str, Any] = {
        "commands": earlier + [c for c in [command] if c not in earlier],
        "started": old.get("started", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "models": sorted(set(old.get("models", [])) | set(models), key=MODELS.index),
        "datasets": {**old.get("datasets", {}), **{k: side_ratios(v) for k, v in chosen.items()}},
        "rows": rows,
    }
    for model in models:
        for name, path in chosen.items():
            if model == "anomnet" and a.anomnet_datasets == "piped" and not name.startswith("PA_"):
                continue
            for aspect in ASPECTS:
                if any(r["dataset"] == name and r["model"] == model and r["aspect"] == aspect for r in rows):
                    continue
                print(f"[aspect] {name}: {model} aspect={aspect}", file=sys.stderr, flush=True)
                rows.append({"dataset": name, "model": model, "aspect": aspect, **run_row(path, model, aspect)})
                atomic_write_text(out, json.dumps(report, indent=2))  # partial results survive
    report["complete"] = True
    atomic_write_text(out, json.dumps(report, indent=2))
    text = render(report)
    print(text)
    if a.markdown:
        write_section(Path(a.markdown), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
