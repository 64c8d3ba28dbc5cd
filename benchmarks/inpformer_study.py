"""The INP-Former study of docs/inpformer.md: accuracy of encoder / level / budget / augmentation variants.

Each variant is fitted on each dataset (as ``anomnet fit`` does: 10 % of the good training images
held out, the threshold calibrated on them) and tested on its test split; only accuracy is recorded
(AUROC, AU-PRO, SegF1) plus the fit record's steps and loss, never a timing (the cores are shared
while the study runs). Run from the repository root; the command is printed first and stored in
the JSON::

    python benchmarks/inpformer_study.py --datasets piped,bottle --variants default \\
        --variant 'lite1:backbone=efficientnet_lite1' --out benchmarks/inpformer-study.json

``--datasets``: ``piped`` (the eight classes), ``bottle``, or class names (``PA_BRG03_TL``).
``--variant NAME:KEY=VALUE;...`` adds a row (repeatable); ``default`` is the detector's defaults.
``--rescore NAME:blur_sigma=2`` adds a row per fitted model scored with that scoring-time setting
(the threshold recalibrated on the same validation images).
A re-run with ``--resume`` keeps the rows of the JSON that are already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from anomnet.bench import command_line
from anomnet.imageio import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PIPED, PIPED_CLASSES, SHARED  # noqa: E402  (the suite's dataset list)

METRICS = ("image_auroc", "pixel_auroc", "au_pro@0.3", "au_pro@0.05", "seg_f1", "pixel_f1_max")


def dataset_paths(spec: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in spec.split(","):
        if item == "piped":
            out.update({c: PIPED / c for c in PIPED_CLASSES})
        elif item == "bottle":
            out["bottle"] = SHARED / "mvtec_ad" / "bottle"
        elif item:
            out[item] = PIPED / item
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, body = text.partition(":")
    settings = dict(kv.split("=", 1) for kv in body.split(";") if kv.strip())
    return name, {k.strip(): v.strip() for k, v in settings.items()}


def run_one(
    model: str, data: Path, settings: dict[str, str], rescores: list[tuple[str, dict[str, str]]]
) -> list[dict[str, Any]]:
    """Fit once, test; then each rescoring (scoring-time settings changed, threshold recalibrated), tested too."""
    from anomnet import api
    from anomnet.data import load_dataset
    from anomnet.decisions.calibrate import calibrate_detector, split_choices

    split = load_dataset(data)
    start = time.perf_counter()
    det = api.fit(model, split, None, settings=settings, progress=False)
    fit_s = time.perf_counter() - start
    train = det.fit_record.phase("train")
    base = {
        "steps": train.steps if train else None,
        "loss_first": train.loss_first if train else None,
        "loss_last": train.loss_last if train else None,
        "fit_s_shared_cores": round(fit_s, 1),  # informative only: measured on shared cores
        "epochs": train.extra.get("epochs") if train else None,
        "config": det.config.to_dict(),  # every setting the row ran with, defaults included
    }
    result = api.test(det, split, progress=False)
    rows = [{"rescore": None, "metrics": {k: result.metrics.get(k) for k in METRICS}, **base}]
    for name, changes in rescores:
        det.config = type(det.config).from_dict({**det.config.to_dict(), **changes})  # read at every prediction
        options, post = split_choices({"max_false_alarm": 0.01})
        calibrate_detector(det, split.validation, options, None, post)
        result = api.test(det, split, progress=False)
        rows.append({"rescore": name, "metrics": {k: result.metrics.get(k) for k in METRICS}, **base})
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | datasets | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for v in variants:
        for group, pick in (("PIPED mean", lambda d: d.startswith("PA_")), ("bottle", lambda d: d == "bottle")):
            sel = [r for r in rows if r["variant"] == v and pick(r["dataset"])]
            if not sel:
                continue
            cells = []
            for m in METRICS:
                vals = [r["metrics"][m] for r in sel if r["metrics"].get(m) is not None]
                cells.append(f"{100 * statistics.mean(vals):.2f}" if vals else "-")
            lines.append(f"| {v} | {group} ({len(sel)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="piped,bottle")
    parser.add_argument("--model", default="inpformer")
    parser.add_argument("--variants", default="default", help="comma-separated: 'default' and/or none")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;...")
    parser.add_argument(
        "--rescore",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE;...",
        help="also score each fitted model with scoring-time settings changed (blur_sigma, top_share)",
    )
    parser.add_argument("--out", required=True, help="JSON report")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants: list[tuple[str, dict[str, str]]] = []
    if "default" in args.variants.split(","):
        variants.append(("default", {}))
    variants += [parse_variant(v) for v in args.variant]
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    commands: list[str] = []
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        rows = old["rows"]
        commands = old.get("commands", [old["command"]] if "command" in old else [])
    done = {(r["variant"], r["dataset"]) for r in rows}
    cmd = command_line()
    commands.append(cmd)
    print(cmd, flush=True)
    rescores = [parse_variant(r) for r in args.rescore]
    for name, settings in variants:
        for dname, path in dataset_paths(args.datasets).items():
            if (name, dname) in done:
                continue
            load = os.getloadavg()[0]
            for result in run_one(args.model, path, settings, rescores):
                label = name if result["rescore"] is None else f"{name} {result.pop('rescore')}"
                result.pop("rescore", None)
                row = {"variant": label, "settings": settings, "dataset": dname, **result, "load_avg_before": load}
                rows.append(row)
                m = row["metrics"]
                print(
                    f"{label:24s} {dname:12s} "
                    + " ".join(f"{k}={100 * m[k]:.2f}" for k in METRICS if m.get(k) is not None)
                    + f" steps={row['steps']} loss={row['loss_last']}",
                    flush=True,
                )
            report = {
                "commands": commands,  # every run that added rows (--resume)
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "model": args.model,
                "rows": rows,
            }
            atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
