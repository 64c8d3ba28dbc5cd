"""Parts in any pose: the rotation augmentation measured on posed stress variants against their sources.

Writes ``benchmarks/pose.json`` and the ``pose`` section of BENCHMARKS.md::

    python benchmarks/pose_study.py --markdown BENCHMARKS.md          # the recorded run
    python benchmarks/pose_study.py --datasets PA_BTN01_RL --out /tmp/p.json   # a quick check

Datasets: MVTec AD bottle and the eight PIPED classes (or MVTec-layout folders given by path), each
as it is (``source``) and as its ``posed`` stress variant (benchmarks/stress.py: every image turned
by its own random angle and cut to a window of 60 % of its side at a random covered place; written
under ``runs/stress`` on first use; ``--kinds rotated`` adds the suite's ``rotated`` variant: every
image turned and cut to the largest centred square, so its scale follows the angle; ``unseen-poses``:
posed test images, training images only placed). Per dataset,
variant, detector and rotation setting the detector is fitted at its defaults otherwise on every
good training image (no calibration: the metrics here need none) and its test split scored: image
AUROC, pixel AUROC, AU-PRO@0.3, fit and test seconds.
Rotation settings: ``r1`` (the default, no augmentation), ``r8`` (``train_rotations=8``: every
image in 8 poses), ``r8s2`` (``train_rotation_samples=2``: each image in its own pose and one of
the 7 turned ones drawn for it). The sources run at ``r1`` only: the target is a posed variant
within 1 point of its source. The run resumes: rows already in the JSON are kept, and every
command that added rows is listed.
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
SECTION = "pose"
MODELS = ("patchcore", "anomnet")
KINDS = ("source", "posed", "rotated", "unseen-poses")  # the dataset itself, stress variants of benchmarks/stress.py
SETTINGS: dict[str, dict[str, str]] = {
    "r1": {},
    "r8": {"train_rotations": "8"},
    "r8s2": {"train_rotations": "8", "train_rotation_samples": "2"},
}
METRICS = (("image_auroc", "img AUROC"), ("pixel_auroc", "px AUROC"), ("au_pro@0.3", "AU-PRO@0.3"))


def sources(names: list[str], root: Path) -> dict[str, Path]:
    """Source name -> MVTec-layout folder: ``bottle``, a PIPED class, ``all`` (the PIPED classes, then bottle),
    or a folder's path."""
    known = {**{c: root / "piped" / c for c in PIPED_CLASSES}, "bottle": root / "mvtec_ad" / "bottle"}
    out: dict[str, Path] = {}
    for name in names:
        if name == "all":
            out.update(known)
        elif name in known:
            out[name] = known[name]
        elif (Path(name) / "train" / "good").is_dir():
            out[Path(name).name] = Path(name)
        else:
            raise SystemExit(f"pose_study: unknown dataset {name!r}; use bottle, a PIPED class, all or a folder")
    return out


def run_row(path: Path, model: str, settings: dict[str, str]) -> dict[str, Any]:
    from anomnet import api
    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector

    split = load_dataset(path)
    det = create_detector(model, settings)
    start = time.perf_counter()
    det.fit(list(split.train), list(split.validation), progress=False)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = api.test(det, split, progress=False).metrics
    test_s = time.perf_counter() - start
    return {"fit_s": fit_s, "test_s": test_s, "metrics": {k: metrics.get(k) for k, _ in METRICS}}


def _fmt(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _find(rows: list[dict[str, Any]], **key: str) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    commands = " and ".join(f"`{c}`" for c in report["commands"])
    sizes = ", ".join(f"{k} at image_size={v}" for k, v in report.get("sizes", {}).items()) or "none"
    lines = [
        "## pose: parts in any pose, rotation augmentation on posed variants",
        "",
        f"Command: {commands} (started {report['started']}; rows kept across resumed runs; {report['cpu']}, "
        f"{report['cpu_cores']} cores shared with other benchmarks, so times are under load; "
        f"torch {report['torch']}).",
        "",
        "Each detector at its defaults but the rotation settings, fitted on the good training images of a "
        "dataset and tested on its test split. posed: the stress variant of benchmarks/stress.py (every "
        "image, train and test, turned by its own random angle and cut to a window of "
        f"{100 * report['posed_side']:.0f} % of its side at a random place the turned image covers; a "
        "defective image's window holds its defect's centre); rotated: the suite's variant (every image turned "
        "and cut to the largest centred square: the part stays centred, its scale follows the angle); "
        "unseen-poses: as posed, but the training images only placed, not turned (test poses the training "
        "never shows); source: "
        "the dataset as it is (a source row with a setting: that augmentation on the dataset itself). Settings: r1 "
        "the default (no augmentation); r8 `train_rotations=8` (every training image in 8 poses, 45 degrees "
        "apart); r8s2 `train_rotations=8 train_rotation_samples=2` (each image in its own pose and one of "
        f"the 7 turned ones, drawn for it). Image size: 256 (the default) except {sizes}. "
        "Δ: variant minus source (r1), in points. Fit: seconds, and as a multiple of the r1 fit on the "
        "same variant run just before it (source rows: seconds only, their r1 row ran in an earlier command).",
        "",
        "| dataset | variant | detector | setting | img AUROC source / variant (Δ) "
        "| AU-PRO@0.3 source / variant (Δ) | px AUROC variant | fit s (x r1) | test s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    means: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for ds, kind, model in ((d, k, m) for d in report["datasets"] for k in KINDS for m in report["models"]):
        src = _find(rows, dataset=ds, variant="source", model=model, setting="r1")
        base = _find(rows, dataset=ds, variant=kind, model=model, setting="r1")
        for setting in SETTINGS:
            row = _find(rows, dataset=ds, variant=kind, model=model, setting=setting)
            if row is None or (kind == "source" and setting == "r1"):  # the reference of every row
                continue
            cells = []
            for key in ("image_auroc", "au_pro@0.3"):
                s = None if src is None else src["metrics"].get(key)
                p = row["metrics"].get(key)
                delta = "" if s is None or p is None else f" ({100 * (p - s):+.2f})"
                cells.append(f"{_fmt(s)} / {_fmt(p)}{delta}")
                if ds.startswith("PA_") and s is not None and p is not None:
                    group = means.setdefault((kind, model, setting), {})
                    group.setdefault(f"{key}:source", []).append(s)
                    group.setdefault(f"{key}:variant", []).append(p)
            # a variant's rows ran one after the other; a source's r1 row ran in an earlier command
            ratio = "" if base is None or kind == "source" else f" ({row['fit_s'] / base['fit_s']:.1f})"
            lines.append(
                f"| {ds} | {kind} | {model} | {setting} | {cells[0]} | {cells[1]} | "
                f"{_fmt(row['metrics'].get('pixel_auroc'))} | {row['fit_s']:.1f}{ratio} | {row['test_s']:.1f} |"
            )
    order = {(k, m, s): (KINDS.index(k), MODELS.index(m), list(SETTINGS).index(s)) for k, m, s in means}
    for (kind, model, setting), vals in sorted(means.items(), key=lambda kv: order[kv[0]]):
        n = len(vals["image_auroc:variant"])
        cells = []
        for key in ("image_auroc", "au_pro@0.3"):
            s, p = statistics.mean(vals[f"{key}:source"]), statistics.mean(vals[f"{key}:variant"])
            cells.append(f"{_fmt(s)} / {_fmt(p)} ({100 * (p - s):+.2f})")
        pairs = zip(vals["image_auroc:source"], vals["image_auroc:variant"], strict=True)
        within = sum(p >= s - 0.01 for s, p in pairs)
        lines.append(
            f"| PIPED mean ({n} classes; {within} within 1 point) | {kind} | {model} | {setting} | {cells[0]} "
            f"| {cells[1]} | | | |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure rotation augmentation on posed variants and their sources.")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated detectors ({', '.join(MODELS)})")
    p.add_argument("--datasets", default="all", help="comma-separated: bottle, PIPED classes, all, or folders")
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"rotation settings on the posed variants ({', '.join(SETTINGS)}); the sources run r1",
    )
    p.add_argument("--anomnet-settings", default="r1", help="rotation settings of anomnet on the posed variants")
    p.add_argument("--kinds", default="posed", help=f"comma-separated stress variants ({', '.join(KINDS)})")
    p.add_argument("--bottle-size", type=int, default=128, help="image_size of the bottle rows (its images are 900 px)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every row")
    p.add_argument("--shared", default=str(SHARED), help="the datasets folder (mvtec_ad/bottle, piped/<class>)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "pose.json"), help="the JSON report")
    p.add_argument("--markdown", default=None, help="also write the 'pose' section of this file")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder for the stress variants")
    p.add_argument("--render", action="store_true", help="only write the table of the JSON report")
    a = p.parse_args(argv)
    command = "python benchmarks/pose_study.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
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

    import stress

    models = [m for m in a.models.split(",") if m]
    if unknown := [m for m in models if m not in MODELS]:
        raise SystemExit(f"pose_study: unknown detector(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    per_model = {m: [s for s in (a.anomnet_settings if m == "anomnet" else a.settings).split(",") if s] for m in models}
    if unknown := sorted({s for ss in per_model.values() for s in ss} - set(SETTINGS)):
        raise SystemExit(f"pose_study: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    kinds = [k for k in a.kinds.split(",") if k]
    if unknown := [k for k in kinds if k not in KINDS]:
        raise SystemExit(f"pose_study: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    extra = dict(kv.split("=", 1) for kv in a.set)
    chosen = sources([n for n in a.datasets.split(",") if n], Path(a.shared))
    old: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    rows: list[dict[str, Any]] = list(old.get("rows", []))
    earlier = old.get("commands", [])
    sizes = {**old.get("sizes", {}), **({"bottle": a.bottle_size} if "bottle" in chosen else {})}
    report: dict[str, Any] = {
        "commands": earlier + [c for c in [command] if c not in earlier],
        "started": old.get("started", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "posed_side": stress.POSED_SIDE,
        "sizes": sizes,
        "settings": {**old.get("settings", {}), **({"all": extra} if extra else {})},
        "models": sorted(set(old.get("models", [])) | set(models), key=MODELS.index),
        "datasets": list(dict.fromkeys([*old.get("datasets", []), *chosen])),
        "rows": rows,
    }
    for name, src in chosen.items():
        made = {k: stress.make_variant(src, k, Path(a.runs) / "stress") for k in kinds if k != "source"}
        variants = {"source": src, **made}
        size = {"image_size": str(sizes[name])} if name in sizes else {}
        for model in models:
            plan = [("source", "r1")] + [(k, s) for k in kinds for s in ["r1", *per_model[model]]]
            for variant, setting in dict.fromkeys(plan):
                if _find(rows, dataset=name, variant=variant, model=model, setting=setting):
                    continue
                settings = {**SETTINGS[setting], **size, **extra}
                print(f"[pose] {name} {variant}: {model} {setting} {settings}", file=sys.stderr, flush=True)
                row = run_row(variants[variant], model, settings)
                rows.append(
                    {
                        "dataset": name,
                        "variant": variant,
                        "model": model,
                        "setting": setting,
                        "settings": settings,
                        **row,
                    }
                )
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
