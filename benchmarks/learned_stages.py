"""BENCHMARKS.md section ``learned-stages``: what each detector's training adds at a CPU budget (issue 23).

Parts (each a list of rows on a few of the suite's datasets, every row fitted, tested and timed in its own
process by the worker of ``anomnet bench``, ``anomnet.bench.detector_worker``):

- ``anomnet``: AnomNet's two training stages over the cached features at 0, 1, 4 and 16 times the default
  epochs (0 = no training: the k-means centroids on the frozen features), and 4 times with a wider adapter
  (rank 144, residual bound 0.9); bottle at 128 px and three PIPED classes at the defaults.
- ``anomnet-table1``: the paper's Table 1 rows (a)-(f) (attraction on in each) from our k-means centroids,
  and (a)-(g), no training and (g) at 4x the epochs from the paper's mean initialisation; bottle-128 and
  PA_BRG03_TL of ``anomnet``'s datasets (whose ``no-training``, ``epochs-x1`` and ``epochs-x4`` rows are k-means' own).
- ``efficientad``: EfficientAD-S and -M at 100 and 300 student / autoencoder steps, and S with the original
  losses (``loss=original``: hard + generic-image penalty instead of CDO) at 100 and 300 steps and both losses at
  800 steps, each also rescored with the normalised local map (``st_map=normalized``, the same fitted model); two
  PIPED classes at their own 128 px.
- ``efficientad-defaults``: EfficientAD at its defaults (S, backbone teacher, 256 px, 800 steps) with CDO (the
  default loss) and with the original losses, each also rescored with ``st_map=normalized``; one PIPED class.
- ``cpr``: CPR's retrieval head at 0 (the randomly initialised head), 50 (default), 200 and 1,000 training
  steps; at 50 steps the reference code's head widths (192 / 256 / 384), its augmentations (``augment``), its
  negative shift (``negative_shift=window``) and its 320 px input, one at a time; three PIPED classes and
  bottle, all at the default 256 px input.
- ``tocoad``: ToCoAD's stage ablation (the paper's: PatchCore itself, i.e. no training and ``reweight=image``; no
  training = PatchCore + eq. 9 on every patch, the default; stage I only; stages I + II, ``stage2=true``, at their
  default budgets; the SimSiam heads on the deeper levels stage5, stage7), its Table 6 (``disc_loss=cross_entropy``
  against the default focal loss), and stage II budgets at which the backbone moves (its learning rate ``lr2`` x10
  and x30, its steps x4), and no training and both stages fitted again with another seed; bottle and three PIPED
  classes, all at 128 px (the PIPED images' own size). Its second table gives each row's fit record: how far stage
  II moved the backbone (relative weight change, bank-level feature cosine), the SimSiam loss by tenths, the
  discriminator's pixel AUROC on fresh synthetic anomalies.

::

    python benchmarks/learned_stages.py --markdown BENCHMARKS.md          # every part (JSON: learned-stages.json)
    python benchmarks/learned_stages.py --parts efficientad --resume benchmarks/learned-stages.json
    python benchmarks/learned_stages.py --dry-run                         # list the rows
    python benchmarks/learned_stages.py --render benchmarks/learned-stages.json --markdown BENCHMARKS.md

The JSON is written after every row, so an interrupted run keeps what it measured and ``--resume`` reuses
those rows (same part, dataset, row and settings); ``--resume`` repeated merges the reports of parts run side by
side (``--resume A.json --resume B.json --merge-only`` writes the merged report and section, measuring nothing;
rows of the plan that none of them has make it INCOMPLETE).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomnet.bench import write_section  # noqa: E402
from suite import PIPED, SHARED  # noqa: E402  (the suite's data paths)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "learned-stages"
BOTTLE = SHARED / "mvtec_ad" / "bottle"

# part -> datasets (name, path, settings every row of the part gets on it)
DATASETS: dict[str, list[tuple[str, str, dict[str, str]]]] = {
    "anomnet": [
        ("bottle-128", str(BOTTLE), {"image_size": "128"}),
        ("PA_BTN01_RL", str(PIPED / "PA_BTN01_RL"), {}),
        ("PA_FVN01_TL", str(PIPED / "PA_FVN01_TL"), {}),
        ("PA_BRG03_TL", str(PIPED / "PA_BRG03_TL"), {}),
    ],
    # at the classes' own 128 px (the default 256 px costs 4x per step; the suite's rows are at 256 px)
    "efficientad": [
        ("PA_BTN01_RL-128", str(PIPED / "PA_BTN01_RL"), {"image_size": "128"}),
        ("PA_FVN01_TL-128", str(PIPED / "PA_FVN01_TL"), {"image_size": "128"}),
    ],
    "efficientad-defaults": [("PA_FVN01_TL", str(PIPED / "PA_FVN01_TL"), {})],
}


DATASETS["anomnet-table1"] = [d for d in DATASETS["anomnet"] if d[0] in ("bottle-128", "PA_BRG03_TL")]  # 2-core budget


def _epochs(times: int) -> dict[str, str]:
    return {"stage1_epochs": str(10 * times), "stage2_epochs": str(10 * times)}


# the paper's Table 1 (attraction on in every row), plus no training and (g) at 4x the epochs
TABLE1: list[tuple[str, dict[str, str]]] = [
    ("no-training", _epochs(0)),
    ("a", {"stages": "1", "use_con": "false"}),
    ("b", {"stages": "1"}),
    ("c", {"use_sep": "false", "use_ent": "false", "use_con": "false"}),
    ("d", {"use_sep": "false", "use_con": "false"}),
    ("e", {"use_ent": "false", "use_con": "false"}),
    ("f", {"use_con": "false"}),
    ("g", {}),
    ("g-epochs-x4", _epochs(4)),
]


def _mean_label(row: str) -> str:
    """``c`` -> ``c-mean``, ``g-epochs-x4`` -> ``g-mean-epochs-x4``, ``no-training`` -> ``no-training-mean``."""
    head, sep, rest = row.partition("-")
    return f"{head}-mean{sep}{rest}" if len(head) == 1 else f"{row}-mean"


# part -> (detector, [(row, settings)], rescore settings)
ROWS: dict[str, tuple[str, list[tuple[str, dict[str, str]]], list[dict[str, str]]]] = {
    "anomnet": (
        "anomnet",
        [
            ("no-training", _epochs(0)),
            ("epochs-x1 (default)", _epochs(1)),
            ("epochs-x4", _epochs(4)),
            ("epochs-x4-wide-adapter", {**_epochs(4), "adapter_rank": "144", "max_residual": "0.9"}),
            ("epochs-x16", _epochs(16)),
        ],
        [],
    ),
    # the paper's Table 1 (attraction on in every row), from our k-means centroids and from the paper's mean
    # initialisation (where its collapse argument, and so separation and entropy, should matter)
    "anomnet-table1": (
        "anomnet",
        [(row, s) for row, s in TABLE1 if row not in ("no-training", "g", "g-epochs-x4")]  # in part anomnet
        + [(_mean_label(row), {**s, "centroid_init": "mean"}) for row, s in TABLE1],
        [],
    ),
    "efficientad": (
        "efficientad",
        [
            ("S-100", {"model_size": "s", "steps": "100"}),
            ("M-100", {"model_size": "m", "steps": "100"}),
            ("S-300", {"model_size": "s", "steps": "300"}),
            ("M-300", {"model_size": "m", "steps": "300"}),
            # CDO (the default loss, the rows above) against the original losses: hard + generic-image penalty
            ("S-100-original", {"model_size": "s", "steps": "100", "loss": "original"}),
            ("S-300-original", {"model_size": "s", "steps": "300", "loss": "original"}),
            ("S-800", {"model_size": "s", "steps": "800"}),
            ("S-800-original", {"model_size": "s", "steps": "800", "loss": "original"}),
        ],
        [{"st_map": "normalized"}],
    ),
    "efficientad-defaults": (
        "efficientad",
        [("cdo-800 (default)", {"steps": "800"}), ("original-800", {"steps": "800", "loss": "original"})],
        [{"st_map": "normalized"}],
    ),
}

# CPR's head: the step budget, and the reference code's settings one at a time at the default budget
DATASETS["cpr"] = [
    ("PA_BTN01_RL", str(PIPED / "PA_BTN01_RL"), {}),
    ("PA_FVN01_TL", str(PIPED / "PA_FVN01_TL"), {}),
    ("PA_BRG03_TL", str(PIPED / "PA_BRG03_TL"), {}),
    ("bottle", str(BOTTLE), {}),
]
ROWS["cpr"] = (
    "cpr",
    [
        ("steps-0 (untrained head)", {"steps": "0"}),
        ("steps-50 (default)", {"steps": "50"}),
        ("steps-200", {"steps": "200"}),
        ("steps-1000", {"steps": "1000"}),
        ("steps-50 augment", {"steps": "50", "augment": "true"}),
        ("steps-50 negative-shift-window", {"steps": "50", "negative_shift": "window"}),
        ("steps-50 reference-widths", {"steps": "50", "head_width": "192", "head_block": "256", "head_dim": "384"}),
        ("steps-50 320px", {"steps": "50", "image_size": "320"}),
    ],
    [],
)

# ToCoAD: the paper's stage ablation and Table 6, and stage II budgets at which the backbone moves
# (every dataset at 128 px: the PIPED images' own size; the default 256 px costs 3-4x a step on 2 cores)
DATASETS["tocoad"] = [
    ("bottle-128", str(BOTTLE), {"image_size": "128"}),
    ("PA_BTN01_RL-128", str(PIPED / "PA_BTN01_RL"), {"image_size": "128"}),
    ("PA_FVN01_TL-128", str(PIPED / "PA_FVN01_TL"), {"image_size": "128"}),
    ("PA_BRG03_TL-128", str(PIPED / "PA_BRG03_TL"), {"image_size": "128"}),
]
_NO_TRAINING = {"stage1": "false", "stage2": "false"}
_TRAINED = {"stage2": "true"}  # stage I follows stage II (the default since these rows: neither)
ROWS["tocoad"] = (
    "tocoad",
    [
        ("patchcore (no training, reweight=image)", {**_NO_TRAINING, "reweight": "image"}),
        ("no-training (PatchCore + eq. 9, the default)", _NO_TRAINING),
        ("stage1-only", {"stage1": "true", "stage2": "false"}),
        ("stage1+2", _TRAINED),
        ("stage1+2 cross-entropy", {**_TRAINED, "disc_loss": "cross_entropy"}),
        ("stage1+2 heads-stage5-7", {**_TRAINED, "head_layers": "stage5,stage7"}),
        ("stage1+2 lr2-x10", {**_TRAINED, "lr2": "0.01"}),
        ("stage1+2 lr2-x30", {**_TRAINED, "lr2": "0.03"}),
        ("stage1+2 heads-stage5-7 lr2-x10", {**_TRAINED, "head_layers": "stage5,stage7", "lr2": "0.01"}),
        ("stage1+2 steps2-x4", {**_TRAINED, "stage2_steps": "400"}),
        # another seed (coreset, synthetic anomalies, views): how far two fits of the same setting differ
        ("no-training (PatchCore + eq. 9, the default) seed-1", {**_NO_TRAINING, "seed": "1"}),
        ("stage1+2 seed-1", {**_TRAINED, "seed": "1"}),
    ],
    [],
)

METRICS = (
    ("image_auroc", "img AUROC"),
    ("pixel_auroc", "px AUROC"),
    ("au_pro@0.3", "AU-PRO@0.3"),
    ("au_pro@0.05", "AU-PRO@0.05"),
    ("seg_f1", "SegF1"),
)


def plan(parts: list[str], wanted: set[str]) -> list[tuple[str, str, str, str, dict[str, str], list[dict[str, str]]]]:
    """(part, dataset, dataset path, row, settings, rescore) in run order: row by row, datasets inside."""
    out = []
    for part in parts:
        detector, rows, rescore = ROWS[part]
        for row, settings in rows:
            for name, path, extra in DATASETS[part]:
                if "all" in wanted or name in wanted:
                    out.append((part, name, path, row, {**extra, **settings}, rescore))
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.mean(vals) if vals else None


def _variants(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The row's own metrics and each rescored model's, with their labels."""
    out = [(row["row"], row["metrics"])]
    for r in row.get("rescored", []):
        label = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        out.append((f"{row['row']} {label}", r["metrics"]))
    return out


def _phase(row: dict[str, Any], name: str) -> dict[str, Any] | None:
    phases = (row.get("fit_record") or {}).get("phases", [])
    return next((p for p in phases if p.get("name") == name), None)


def _tocoad_details(row: dict[str, Any]) -> list[str]:
    """A ToCoAD row's fit record: stage seconds, what stage II did to the backbone, its losses, stage I's check."""
    s1, s2 = _phase(row, "stage1"), _phase(row, "stage2")
    secs = " / ".join("-" if p is None else f"{p['seconds']:.0f}" for p in (s1, s2))
    if s2 is None:
        moved = cosine = sym = neg = "-"
    else:
        extra = s2.get("extra", {})
        change = extra.get("backbone_change", {})
        moved = f"{change.get('relative', float('nan')):.1e} ({change.get('largest_relative', float('nan')):.1e})"
        cosine = " / ".join(f"{v:.4f}" for v in extra.get("feature_cosine", {}).values())
        curve = extra.get("curve", {})
        sym, neg = (f"{curve[k][0]:.3f} / {curve[k][-1]:.3f}" if curve.get(k) else "-" for k in ("sym", "neg"))
    auroc = None if s1 is None else s1.get("extra", {}).get("synthetic_pixel_auroc")
    return [secs, moved, cosine or "-", sym, neg, "-" if auroc is None else f"{100 * auroc:.2f}"]


# part -> (column headers, a row's cells): a second table per dataset and row, from the fit record
DETAILS: dict[str, tuple[list[str], Any]] = {
    "tocoad": (
        [
            "stage I / II s",
            "stage II weight change, relative (the most-moved tensor's own)",
            "feature cosine per bank level",
            "L_sym first / last tenth",
            "L_neg first / last tenth",
            "stage I synthetic px AUROC",
        ],
        _tocoad_details,
    )
}


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        f"## {SECTION}",
        "",
        *(
            [f"Command: `{report['command']}`"]
            if len(report.get("commands", [])) < 2
            else ["Commands, one after another (each later one resumes the earlier's JSON):", ""]
            + [f"Command: `{c}`  " for c in report["commands"]]
        ),
        "",
        f"Machine: {report['cpu']}, {report['cpu_cores']} cores, torch {report['torch']}; {report['started']}; "
        f"{'the commands added up (parts ran side by side)' if len(report.get('commands', [])) > 1 else 'whole run'} "
        f"{report['seconds'] / 60:.0f} min; 1-minute load average {report['load_min']:.1f}-"
        f"{report['load_max']:.1f} during the run (other jobs shared the 2 cores: fit seconds and predict ratios "
        "are not comparable between rows, the accuracy columns are)"
        f"{'' if report.get('complete') else ' (INCOMPLETE: the run stopped before its last row)'}.",
        "",
        "Metrics in percent on the test split. Predict: batch 1, as a multiple of the backbone trunk timed beside "
        "it. A row named `ROW st_map=normalized` is the same fitted model scored with the normalised local map.",
    ]
    for part in dict.fromkeys(r["part"] for r in rows):
        sel = [r for r in rows if r["part"] == part]
        names = list(dict.fromkeys(r["dataset"] for r in sel))
        labels = list(dict.fromkeys(label for r in sel for label, _ in _variants(r)))
        lines += ["", f"### {part}", "", "Means over " + ", ".join(names) + " (rows measured on all of them):", ""]
        lines.append("| row | " + " | ".join(h for _, h in METRICS) + " | datasets |")
        lines.append("|---" * (len(METRICS) + 2) + "|")
        for label in labels:
            found = [m for r in sel for lab, m in _variants(r) if lab == label]
            if len(found) < len(names):
                lines.append(f"| {label} | " + " | ".join("-" for _ in METRICS) + f" | {len(found)} of {len(names)} |")
                continue
            lines.append(
                f"| {label} | "
                + " | ".join(_fmt(_mean([m.get(k) for m in found])) for k, _ in METRICS)
                + f" | {len(found)} |"
            )
        lines += [
            "",
            "| dataset | row | settings | " + " | ".join(h for _, h in METRICS) + " | fit s | predict x trunk |",
        ]
        lines.append("|---" * (len(METRICS) + 5) + "|")
        for n in names:
            for r in (r for r in sel if r["dataset"] == n):
                settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
                ratio = r.get("ratio_b1")
                for label, m in _variants(r):
                    fit = f"{r['fit_s']:.0f}" if label == r["row"] else "(same model)"
                    pred = "n/a" if ratio is None or label != r["row"] else f"{ratio:.1f}"
                    lines.append(
                        f"| {n} | {label} | {settings} | "
                        + " | ".join(_fmt(m.get(k)) for k, _ in METRICS)
                        + f" | {fit} | {pred} |"
                    )
        if part in DETAILS:
            headers, cells = DETAILS[part]
            lines += ["", "What each fit did (its fit record):", "", "| dataset | row | " + " | ".join(headers) + " |"]
            lines.append("|---" * (len(headers) + 2) + "|")
            lines += [
                f"| {r['dataset']} | {r['row']} | " + " | ".join(cells(r)) + " |"
                for n in names
                for r in sel
                if r["dataset"] == n
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"Produce the '{SECTION}' section of BENCHMARKS.md (issue 23).")
    p.add_argument("--parts", default=",".join(ROWS), help=f"comma-separated parts (default {','.join(ROWS)})")
    p.add_argument("--datasets", default="all", help="comma-separated dataset names (default all of each part)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / f"{SECTION}.json"), help="the JSON report")
    p.add_argument("--markdown", default=None, help=f"also write the '{SECTION}' section of this file")
    p.add_argument(
        "--resume", metavar="JSON", action="append", default=[], help="reuse the rows of earlier reports (repeatable)"
    )
    p.add_argument("--render", metavar="JSON", help="only write the table of an earlier run's JSON report")
    p.add_argument(
        "--merge-only", action="store_true", help="with --resume: write the merged report, measure nothing new"
    )
    p.add_argument("--dry-run", action="store_true", help="list the rows and exit")
    a = p.parse_args(argv)
    if a.render:
        text = render(json.loads(Path(a.render).read_text()))
        print(text)
        if a.markdown:
            write_section(Path(a.markdown), SECTION, text)
        return 0
    parts = [x for x in a.parts.split(",") if x]
    unknown = [x for x in parts if x not in ROWS]
    if unknown:
        raise SystemExit(f"{SECTION}: unknown part(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    todo = plan(parts, set(a.datasets.split(",")))
    if not todo:
        raise SystemExit(f"{SECTION}: no dataset matches {a.datasets!r}")
    if a.dry_run:
        for part, name, _, row, settings, rescore in todo:
            print(part, name, row, settings, rescore or "")
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from anomnet.bench import _cpu_name, _run_worker
    from anomnet.imageio import atomic_write_text

    earlier = [json.loads(Path(f).read_text()) for f in a.resume]
    resumed: list[dict[str, Any]] = [r for e in earlier for r in e.get("rows", [])]
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    rows: list[dict[str, Any]] = []
    loads += [e[k] for e in earlier for k in ("load_min", "load_max") if k in e]
    started = min([e["started"] for e in earlier if "started" in e], default=None)
    started = started or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    earlier_commands = list(
        dict.fromkeys(c for e in earlier for c in e.get("commands", [e["command"]] if "command" in e else []))
    )
    earlier_seconds = sum(e.get("seconds", 0.0) for e in earlier)
    command = "python benchmarks/learned_stages.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    work = tempfile.mkdtemp(prefix="anomnet-learned-")

    def key(r: dict[str, Any]) -> tuple[str, str, str, str]:
        return r["part"], r["dataset"], r["row"], json.dumps(r["settings"], sort_keys=True)

    planned = {(p_, n, r_, json.dumps(s, sort_keys=True)) for p_, n, _, r_, s, _ in todo}

    def report() -> dict[str, Any]:
        kept = [r for r in resumed if key(r) not in planned]  # an earlier command's rows outside this plan
        return {
            "command": command,
            "commands": [*earlier_commands, command],
            "started": started,
            "cpu": _cpu_name(),
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "seconds": earlier_seconds + time.perf_counter() - start,
            "load_min": min(loads),
            "load_max": max(loads),
            "rows": kept + rows,
        }

    skipped = 0
    try:
        for part, name, path, row, settings, rescore in todo:
            done = next((r for r in resumed if key(r) == (part, name, row, json.dumps(settings, sort_keys=True))), None)
            if done is not None:
                rows.append(done)
                continue
            if a.merge_only:
                skipped += 1
                continue
            print(f"[{SECTION}] {part} {name}: {row}", file=sys.stderr, flush=True)
            detector = ROWS[part][0]
            spec: dict[str, Any] = {
                "name": f"{name}-{row}",
                "model": detector,
                "settings": settings,
                "data": path,
                "category": None,
                "out": str(Path(work) / "model"),
                "rescore": rescore,
            }
            res = _run_worker("detector", spec)
            shutil.rmtree(spec["out"], ignore_errors=True)
            loads.append(os.getloadavg()[0])
            trunk = res.get("trunk_ms_b1")
            res["ratio_b1"] = res["predict_ms_b1"] / trunk if trunk else None
            rows.append({"part": part, "dataset": name, "row": row, "detector": detector, "settings": settings, **res})
            atomic_write_text(a.out, json.dumps(report(), indent=2, default=str))  # partial results survive
    finally:
        shutil.rmtree(work, ignore_errors=True)
    final = {**report(), "complete": not skipped}
    atomic_write_text(a.out, json.dumps(final, indent=2, default=str))
    text = render(final)
    print(text)
    if a.markdown:
        write_section(Path(a.markdown), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
