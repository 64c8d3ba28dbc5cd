"""The benchmark suite: every detector on every dataset in one run, one table per metric group.

Datasets: MVTec AD bottle, the eight PIPED paper-impurity classes, ELPV solar cells (image
labels only) and the seeded stress variants of benchmarks/stress.py (a part in arbitrary
rotation; crops of varying size and aspect ratio). Per dataset and detector it fits, tests and
times one row in its own process (the worker of ``anomnet bench``), then writes the JSON report
and the ``suite`` section of BENCHMARKS.md::

    python benchmarks/suite.py                       # the whole suite (budget in BENCHMARKS.md)
    python benchmarks/suite.py --models patchcore --datasets piped   # a subset, for a quick look
    python benchmarks/suite.py --dry-run             # list the rows

A subset run writes its own JSON (``--out``) and never the committed section unless asked.
The table, not bottle alone, decides the defaults.
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
PIPED = SHARED / "piped"
PIPED_CLASSES = (
    "PA_BDP01_TL",
    "PA_BFT01_TL",
    "PA_BRG01_RL",
    "PA_BRG03_TL",
    "PA_BTN01_RL",
    "PA_FLR01_TL",
    "PA_FVN01_TL",
    "PA_FVN02_RL",
)
ELPV_TRAIN = 300
STRESS_SOURCE = "PA_BTN01_RL"  # the class the stress variants are made from
STRESS_KINDS = ("rotated", "crops")

# Each detector's settings in the suite: its defaults unless a budget is named here.
MODELS: dict[str, dict[str, str]] = {
    "patchcore": {},
    "anomnet": {},
    "efficientad": {"steps": "100"},  # reduced budget (default 800 steps)
    "tocoad": {},  # its default trains nothing (stage II measured no better, docs/tocoad.md)
}
BUDGET_NOTES = {
    "efficientad": "reduced budget, 100 student/autoencoder steps (default 800)",
}
GROUPS = {"bottle": "bottle", "piped": "PIPED mean", "elpv": "ELPV", "stress": "stress"}


def datasets(runs: Path) -> list[dict[str, str]]:
    """The suite's datasets: name, path, group (stress variants are written on first use)."""
    out = [{"name": "bottle", "path": str(SHARED / "mvtec_ad" / "bottle"), "group": "bottle"}]
    out += [{"name": c, "path": str(PIPED / c), "group": "piped"} for c in PIPED_CLASSES]
    # ELPV: 300 of its 905 good training cells (seeded), so every detector fits in minutes; the whole test split
    out.append({"name": "elpv", "path": "elpv", "group": "elpv", "max_train": str(ELPV_TRAIN)})
    out += [
        {"name": f"{STRESS_SOURCE}-{k}", "path": str(runs / "stress" / f"{STRESS_SOURCE}-{k}"), "group": "stress"}
        for k in STRESS_KINDS
    ]
    return out


def _matches(dataset: dict[str, str], wanted: set[str]) -> bool:
    """Whether a dataset is named in ``wanted`` by its name or its group ("all": every dataset)."""
    return "all" in wanted or dataset["name"] in wanted or dataset["group"] in wanted


def _ensure_stress(runs: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stress

    for kind in STRESS_KINDS:
        stress.make_variant(PIPED / STRESS_SOURCE, kind, runs / "stress")


METRICS = (
    ("image_auroc", "img AUROC"),
    ("pixel_auroc", "px AUROC"),
    ("au_pro@0.3", "AU-PRO@0.3"),
    ("au_pro@0.05", "AU-PRO@0.05"),
    ("seg_f1", "SegF1"),
    ("recall", "recall@thr"),
    ("false_alarm_rate", "false alarm@thr"),
)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r["metrics"].get(key) for r in rows]
    vals = [v for v in vals if v is not None and v == v]
    return statistics.mean(vals) if vals else None


def _variant_note(rows: list[dict[str, Any]]) -> str:
    """One sentence naming each variant row's detector, settings and datasets (empty when there are none)."""
    notes = []
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] not in MODELS):
        sel = [r for r in rows if r["model"] == name]
        base = MODELS.get(sel[0]["detector"], {})
        extra = {k: v for k, v in sel[0]["settings"].items() if k != "cache_dir" and base.get(k) != v}
        settings = ", ".join(f"{k}={v}" for k, v in extra.items()) or "its suite settings"
        notes.append(f"{name}: {sel[0]['detector']} with {settings}, on {', '.join(r['dataset'] for r in sel)}")
    return " Variant rows: " + "; ".join(notes) + "." if notes else ""


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = [
        "## suite",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['cpu']}, {report['cpu_cores']} cores, torch {report['torch']}; "
        f"{report['started']}; whole run {report['seconds'] / 60:.0f} min; "
        f"1-minute load average {report['load_min']:.1f}-{report['load_max']:.1f} during the run"
        f"{'' if report.get('complete') else ' (INCOMPLETE: the run stopped before its last row)'}.",
        "",
        "Budgets: "
        + (
            "every detector at its defaults except "
            + "; ".join(f"{m}: {BUDGET_NOTES[m]}" for m in models if m in BUDGET_NOTES)
            if any(m in BUDGET_NOTES for m in models)
            else "every detector at its defaults"
        )
        + "."
        + _variant_note(rows)
        + f" ELPV: {ELPV_TRAIN} of its good training cells (seeded), the whole test split; it has image labels "
        "only: its pixel columns are n/a. recall@thr and false alarm@thr: "
        "defective images found and good test images flagged at the model's own threshold "
        "(1 % false alarms asked, on its default calibration images: leave-one-out scores of every training "
        "image for the memory-bank detectors, 10 % held out for the others). Time: fit in seconds; predict "
        "(batch 1) as a multiple of the backbone trunk timed beside it.",
        "",
        "### Means",
        "",
        "| detector | " + " | ".join(GROUPS[g] + " img AUROC" for g in GROUPS) + " | PIPED AU-PRO@0.3 |",
        "|---" * (len(GROUPS) + 2) + "|",
    ]
    for m in models:
        cells = []
        for g in GROUPS:
            sel = [r for r in rows if r["model"] == m and r["group"] == g]
            cells.append(_fmt(_mean(sel, "image_auroc")) if sel else "-")
        piped = [r for r in rows if r["model"] == m and r["group"] == "piped"]
        cells.append(_fmt(_mean(piped, "au_pro@0.3")) if piped else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### Per dataset", ""]
    lines.append("| dataset | detector | " + " | ".join(h for _, h in METRICS) + " | fit s | predict x trunk |")
    lines.append("|---" * (len(METRICS) + 4) + "|")
    for n in names:
        for m in models:
            r = next((r for r in rows if r["dataset"] == n and r["model"] == m), None)
            if r is None:
                continue
            ratio = r.get("ratio_b1")
            lines.append(
                f"| {n} | {m} | "
                + " | ".join(_fmt(r["metrics"].get(k)) for k, _ in METRICS)
                + f" | {r['fit_s']:.0f} | {'n/a' if ratio is None else f'{ratio:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the benchmark suite (every detector on every dataset).")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated detectors (default {','.join(MODELS)})")
    p.add_argument(
        "--datasets", default="all", help="comma-separated dataset names or groups (bottle, piped, elpv, stress; all)"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "suite.json"), help="the JSON report")
    p.add_argument("--markdown", default=None, help="also write the 'suite' section of this file (e.g. BENCHMARKS.md)")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder for the stress variants and caches")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:model=DETECTOR;KEY=VALUE;...",
        help="an extra row per dataset, e.g. 'anomnet-K4096:model=anomnet;num_centroids=4096' (repeatable); "
        "'datasets=bottle,piped' limits it to those datasets or groups",
    )
    p.add_argument("--dry-run", action="store_true", help="list the rows and exit")
    p.add_argument(
        "--resume",
        metavar="JSON",
        help="reuse the rows of an interrupted run's report (same dataset, row and settings)",
    )
    p.add_argument("--render", metavar="JSON", help="only write the table of an earlier run's JSON report")
    a = p.parse_args(argv)
    if a.render:
        text = render(json.loads(Path(a.render).read_text()))
        print(text)
        if a.markdown:
            write_section_of(Path(a.markdown), text)
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runs = Path(a.runs)
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"suite: unknown detector(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    # row name -> (detector, settings): the detectors at their suite budgets, then the variants
    configs: dict[str, tuple[str, dict[str, str]]] = {m: (m, dict(MODELS[m])) for m in models}
    only: dict[str, set[str]] = {}  # row name -> the datasets (names or groups) it runs on, if not all
    for item in a.variant:
        name, _, body = item.partition(":")
        kv = dict(x.split("=", 1) for x in body.split(";") if "=" in x)
        model = kv.pop("model", "")
        if not name or model not in MODELS:
            raise SystemExit(f"suite: --variant {item!r}: expected NAME:model=DETECTOR;KEY=VALUE;...")
        if "datasets" in kv:  # e.g. a default-budget row only where its fit time allows
            only[name] = set(kv.pop("datasets").split(","))
        configs[name] = (model, {**MODELS[model], **kv})
    wanted = set(a.datasets.split(","))
    chosen = [d for d in datasets(runs) if _matches(d, wanted)]
    if not chosen:
        raise SystemExit(f"suite: no dataset matches {a.datasets!r}")
    if a.dry_run:
        for d in chosen:
            for name, (model, cfg) in configs.items():
                if name not in only or _matches(d, only[name]):
                    print(d["name"], name, model, cfg)
        return 0
    if any(d["group"] == "stress" for d in chosen):
        _ensure_stress(runs)
    import torch

    from anomnet.bench import _cpu_name, _run_worker
    from anomnet.imageio import atomic_write_text

    for model, cfg in configs.values():
        if model == "efficientad":
            cfg.setdefault("cache_dir", str(runs / "suite" / "efficientad-cache"))
    resumed: list[dict[str, Any]] = json.loads(Path(a.resume).read_text())["rows"] if a.resume else []
    start, loads, rows = time.perf_counter(), [os.getloadavg()[0]], []
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    work = tempfile.mkdtemp(prefix="anomnet-suite-")  # the fitted models; removed at the end
    command = "python benchmarks/suite.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    report: dict[str, Any] = {}
    # detector by detector, so an interrupted run still has whole detectors (its JSON is kept after each row)
    for m, (model, cfg) in configs.items():
        for d in chosen:
            if m in only and not _matches(d, only[m]):
                continue
            print(f"[suite] {d['name']}: {m}", file=sys.stderr, flush=True)
            spec: dict[str, Any] = {
                "name": f"{d['name']}-{m}",
                "model": model,
                "settings": cfg,
                "data": d["path"],
                "category": None,
                "out": str(Path(work) / f"{d['name']}-{m}"),
            }
            if "max_train" in d:
                spec["max_train"] = int(d["max_train"])
            done = next(
                (r for r in resumed if r["dataset"] == d["name"] and r["model"] == m and r["settings"] == cfg), None
            )
            if done is not None:  # the same row of an earlier run of this code
                rows.append(done)
                continue
            res = _run_worker("detector", spec)
            loads.append(os.getloadavg()[0])
            if "trunk_ms_b1" in res:
                res["ratio_b1"] = res["predict_ms_b1"] / res["trunk_ms_b1"]
            rows.append(
                {"dataset": d["name"], "group": d["group"], "model": m, "detector": model, "settings": cfg, **res}
            )
            report = {
                "command": command,
                "started": started,
                "cpu": _cpu_name(),
                "cpu_cores": os.cpu_count(),
                "torch": torch.__version__,
                "seconds": time.perf_counter() - start,
                "load_min": min(loads),
                "load_max": max(loads),
                "rows": rows,
            }
            atomic_write_text(a.out, json.dumps(report, indent=2, default=str))  # partial results survive
    shutil.rmtree(work, ignore_errors=True)
    report["complete"] = True
    atomic_write_text(a.out, json.dumps(report, indent=2, default=str))
    text = render(report)
    print(text)
    if a.markdown:
        write_section_of(Path(a.markdown), text)
    return 0


def write_section_of(markdown: Path, text: str) -> None:
    from anomnet.bench import write_section

    write_section(markdown, "suite", text)


if __name__ == "__main__":
    sys.exit(main())
