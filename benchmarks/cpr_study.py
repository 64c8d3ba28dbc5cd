"""The CPR choices study (docs/cpr.md): accuracy of fit-time and scoring-time variants on PIPED and bottle.

Run from the repository root; the command is printed and stored in the JSON::

    python benchmarks/cpr_study.py --datasets piped,bottle --out benchmarks/cpr-choices.json \\
        --fit 'default:' --fit 'steps0:steps=0' --score 'k5:k_images=5' --score 'fg-off:foreground=off'

Each ``--fit NAME:KEY=VALUE;...`` is fitted once per dataset (``api.fit``: the 10 % validation split
calibrates, as ``anomnet fit``) and tested; each ``--score NAME:KEY=VALUE;...`` re-scores that fitted
model with scoring-time settings changed (``anomnet.bench.rescore``: recalibrated on the validation
images, then tested). Accuracy only: fit seconds are recorded but were taken on shared cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PIPED_CLASSES, SHARED  # noqa: E402  (the suite's datasets)

METRICS = ("image_auroc", "pixel_auroc", "au_pro@0.3", "au_pro@0.05", "seg_f1")


def _datasets(spec: str) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for item in filter(None, spec.split(",")):
        if item == "piped":
            out += [(c, SHARED / "piped" / c) for c in PIPED_CLASSES]
        elif item == "bottle":
            out.append(("bottle", SHARED / "mvtec_ad" / "bottle"))
        else:
            out.append((item, SHARED / "piped" / item))
    return out


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        settings[k.strip()] = v.strip()
    return name, settings


def _row(
    dataset: str, fit: str, score: str | None, settings: dict[str, str], metrics: dict[str, float]
) -> dict[str, Any]:
    return {"dataset": dataset, "fit": fit, "score": score, "settings": settings, "metrics": metrics}


def render(report: dict[str, Any]) -> str:
    """Per variant: PIPED means, bottle, and per-class AU-PRO@0.3 (percent)."""
    rows = report["rows"]
    names = list(dict.fromkeys((r["fit"], r["score"]) for r in rows))
    lines = [f"Command: `{report['command']}`", ""]
    lines.append(
        "| variant | PIPED img AUROC | PIPED px AUROC | PIPED AU-PRO@0.3 | PIPED AU-PRO@0.05 | PIPED SegF1 "
        "| bottle img AUROC | bottle AU-PRO@0.3 | bottle AU-PRO@0.05 | fit s (PIPED mean) |"
    )
    lines.append("|---" * 10 + "|")
    for fit, score in names:
        sel = [r for r in rows if r["fit"] == fit and r["score"] == score]
        piped = [r for r in sel if r["dataset"].startswith("PA_")]
        bottle = next((r for r in sel if r["dataset"] == "bottle"), None)

        def mean(key: str, rs: list[dict[str, Any]] = piped) -> str:
            vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
            return f"{100 * statistics.mean(vals):.2f} ({len(vals)})" if vals else "-"

        fit_s = [r["fit_s"] for r in piped if "fit_s" in r]
        fit_text = f"{statistics.mean(fit_s):.0f}" if fit_s else "-"

        def b(key: str, bottle: dict[str, Any] | None = bottle) -> str:
            return f"{100 * bottle['metrics'][key]:.2f}" if bottle else "-"

        label = fit if score is None else f"{fit} + {score}"
        lines.append(
            f"| {label} | {mean('image_auroc')} | {mean('pixel_auroc')} | {mean('au_pro@0.3')} | {mean('au_pro@0.05')} "
            f"| {mean('seg_f1')} | {b('image_auroc')} | {b('au_pro@0.3')} | {b('au_pro@0.05')} | {fit_text} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="piped,bottle", help="piped, bottle, or PIPED class names (comma-separated)")
    p.add_argument("--fit", action="append", default=[], metavar="NAME:KEY=VALUE;...", help="a fitted variant")
    p.add_argument("--score", action="append", default=[], metavar="NAME:KEY=VALUE;...", help="a re-scored variant")
    p.add_argument("--base", default="", metavar="KEY=VALUE;...", help="settings of every variant")
    p.add_argument("--out", required=True, help="the JSON report (rows are added as they are measured)")
    p.add_argument("--render", action="store_true", help="only print the table of --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.render:
        print(render(json.loads(out.read_text())))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    import anomnet.detectors.cpr  # noqa: F401  (registers cpr)
    from anomnet import api
    from anomnet.bench import command_line, rescore
    from anomnet.data import load_dataset
    from anomnet.imageio import atomic_write_text

    torch.set_num_threads(int(os.environ.get("CPR_STUDY_THREADS", "1")))
    command = command_line()
    print(command, file=sys.stderr)
    base = _variant(":" + a.base)[1]
    fits = [_variant(v) for v in a.fit] or [("default", {})]
    scores = [_variant(v) for v in a.score]
    report: dict[str, Any] = {"command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "rows": []}
    if out.exists():  # resume: keep the rows already measured
        report["rows"] = json.loads(out.read_text()).get("rows", [])
    done = {(r["dataset"], r["fit"], r["score"]) for r in report["rows"]}
    for dataset, path in _datasets(a.datasets):
        split = load_dataset(path)
        for fit_name, fit_settings in fits:
            settings = {**base, **fit_settings}
            wanted = [(fit_name, None)] + [(fit_name, s) for s, _ in scores]
            if all((dataset, f, s) in done for f, s in wanted):
                continue
            t, cpu = time.perf_counter(), time.process_time()
            det = api.fit("cpr", split, settings=settings, progress=False)
            fit_s, fit_cpu_s = time.perf_counter() - t, time.process_time() - cpu
            metrics = api.test(det, split, progress=False).metrics
            row = _row(dataset, fit_name, None, settings, metrics)
            row["fit_s"] = fit_s
            row["fit_cpu_s"] = fit_cpu_s  # CPU seconds of this process (the wall time depends on the shared load)
            row["load_avg"] = os.getloadavg()[0]
            row["fit_record"] = det.fit_record.to_dict()
            report["rows"].append(row)
            print(
                dataset,
                fit_name,
                {k: round(100 * metrics[k], 2) for k in METRICS},
                f"fit {fit_s:.0f} s",
                file=sys.stderr,
            )
            for score_name, changes in scores:
                m = rescore(det, split, changes)
                report["rows"].append(_row(dataset, fit_name, score_name, {**settings, **changes}, m))
                print(dataset, fit_name, score_name, {k: round(100 * m[k], 2) for k in METRICS}, file=sys.stderr)
            atomic_write_text(out, json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
