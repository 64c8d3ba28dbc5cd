"""BENCHMARKS.md section ``hybrid``: INP-Former, CPR and the hybrid beside PatchCore and AnomNet (issue 13).

Datasets: MVTec AD bottle at full resolution resized (``bottle``) and tiled (``bottle-tiled``,
512 px tiles), and the eight PIPED paper-impurity classes. Every row is fitted, tested and timed
in its own process by the worker of ``anomnet bench`` (``anomnet.bench.detector_worker``): image
AUROC, pixel AUROC, AU-PRO@0.3 / @0.05, SegF1 at the model's own validation-chosen threshold (the
default good-pixel quantile, and rescored at the paper's ``mean + 3 std`` of the good validation
pixels) and at the oracle threshold (the pixel F1-max of the test maps), fit seconds, predict time
as a multiple of the backbone trunk, peak RSS. Hybrid rows also record the branch choice with its
evidence and every branch tested on its own, so the choice is judged in hindsight::

    python benchmarks/hybrid.py --markdown BENCHMARKS.md       # the whole section (JSON: benchmarks/hybrid.json)
    python benchmarks/hybrid.py --resume benchmarks/hybrid.json --markdown BENCHMARKS.md   # go on after a stop
    python benchmarks/hybrid.py --datasets bottle-tiled --models patchcore,hybrid --resume benchmarks/hybrid.json
        # more rows: a resumed run keeps the earlier rows outside its plan and lists every command
    python benchmarks/hybrid.py --datasets PA_BTN01_RL --models patchcore,hybrid --out /tmp/h.json   # a subset
    python benchmarks/hybrid.py --dry-run                      # list the rows
    python benchmarks/hybrid.py --render benchmarks/hybrid.json --markdown BENCHMARKS.md   # table only

The JSON is written after every row, so an interrupted run keeps what it measured and
``--resume`` reuses those rows (same dataset, row and settings).
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
from suite import PIPED, PIPED_CLASSES, SHARED  # noqa: E402  (the suite's data paths)

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = SHARED / "mvtec_ad" / "bottle"
TILE = "512"
SECTION = "hybrid"

# row name -> (detector, settings): each at its defaults unless a budget is named here
MODELS: dict[str, tuple[str, dict[str, str]]] = {
    "patchcore": ("patchcore", {}),
    "anomnet": ("anomnet", {}),
    "inpformer": ("inpformer", {}),
    "cpr": ("cpr", {}),
    "hybrid": ("hybrid", {}),
    "hybrid-fuse": ("hybrid", {"mode": "fuse"}),
}
# extra settings per dataset: the tiled bottle rows tile (PatchCore keeps 1 % of the tile patches, as in the
# tiling section: 10 % of every tile's patches is a bank of millions); the hybrid passes the tile to its branches
TILED = {"tile": TILE}
TILED_MODEL = {"patchcore": {"coreset_ratio": "0.01"}}
RESCORE = [{"pixel_method": "mean-std"}]  # SegF1 at mean + 3 std of the good validation pixels (MVTec AD 2's baseline)

METRICS = (
    ("image_auroc", "img AUROC"),
    ("pixel_auroc", "px AUROC"),
    ("au_pro@0.3", "AU-PRO@0.3"),
    ("au_pro@0.05", "AU-PRO@0.05"),
    ("seg_f1", "SegF1 @own"),
    ("seg_f1_mean_std", "SegF1 @mean+3std"),
    ("pixel_f1_max", "SegF1 @oracle"),
)
HINDSIGHT = ("au_pro@0.05", "seg_f1")  # the branch best on the test set by these, for the choice's verdict


def datasets() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "bottle", "path": str(BOTTLE), "group": "bottle", "settings": {}},
        {"name": "bottle-tiled", "path": str(BOTTLE), "group": "bottle-tiled", "settings": dict(TILED)},
    ]
    out += [{"name": c, "path": str(PIPED / c), "group": "piped", "settings": {}} for c in PIPED_CLASSES]
    return out


def row_settings(model: str, dataset: dict[str, Any]) -> tuple[str, dict[str, str]]:
    detector, settings = MODELS[model]
    extra = dict(dataset["settings"])
    if extra:
        extra.update(TILED_MODEL.get(model, {}))
    return detector, {**settings, **extra}


def trunk_key(detector: str, settings: dict[str, str]) -> tuple[str, int]:
    """Backbone and input size of a row's trunk (a hybrid: of its first branch)."""
    from anomnet.detectors import create_detector

    det = create_detector(detector, settings)
    config = det.config.branch_configs[next(iter(det.config.branch_configs))] if detector == "hybrid" else det.config
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return str(get("backbone", "efficientnet_lite0")), int(get("image_size", 256))


def _fmt(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.mean(vals) if vals else None


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    m = dict(row["metrics"])
    rescored = next((r for r in row.get("rescored", []) if r["settings"] == RESCORE[0]), None)
    m["seg_f1_mean_std"] = rescored["metrics"].get("seg_f1") if rescored else None
    return m


def _best(tested: dict[str, Any], key: str) -> str | None:
    values = {a: t["metrics"].get(key) for a, t in tested.items()}
    values = {a: v for a, v in values.items() if v is not None and v == v}
    return max(values, key=lambda a: values[a]) if values else None


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    models = list(dict.fromkeys(r["row"] for r in rows))
    names = list(dict.fromkeys(r["dataset"] for r in rows))
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
        f"whole run {report['seconds'] / 60:.0f} min; 1-minute load average {report['load_min']:.1f}-"
        f"{report['load_max']:.1f} during the run"
        f"{'' if report.get('complete') else ' (INCOMPLETE: the run stopped before its last row)'}.",
        "",
        "Every detector at its defaults (`hybrid`: branches, criterion and selection data at their defaults; "
        "`hybrid-fuse`: mode=fuse). bottle: the 900 px images resized to each detector's input size; "
        f"bottle-tiled: {TILE} px tiles (PatchCore with a 1 % coreset, as in section tiling). SegF1 @own: at the "
        "model's pixel threshold from its good validation images (default quantile 1e-4); @mean+3std: the same "
        "model recalibrated to mean + 3 std of the good validation pixels (MVTec AD 2's baseline threshold, not "
        "the paper's per-object F1 choice); @oracle: the "
        "pixel F1-max of the test maps (the best threshold in hindsight, no post-processing). Predict: batch 1, "
        "as a multiple of the backbone trunk timed beside it (tiled rows: the whole full-resolution image against "
        "one trunk pass at the input size). Peak RSS in MB.",
        "",
        "### Means",
        "",
        "| detector | PIPED img AUROC | PIPED AU-PRO@0.05 | PIPED SegF1 @own | PIPED SegF1 @oracle "
        "| bottle AU-PRO@0.05 | bottle SegF1 @own | bottle-tiled AU-PRO@0.05 | bottle-tiled SegF1 @own |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        cells = []
        piped = [_metrics(r) for r in rows if r["row"] == m and r["group"] == "piped"]
        for key in ("image_auroc", "au_pro@0.05", "seg_f1", "pixel_f1_max"):
            cells.append(_fmt(_mean([x.get(key) for x in piped])) if piped else "-")
        for group in ("bottle", "bottle-tiled"):
            sel = [_metrics(r) for r in rows if r["row"] == m and r["group"] == group]
            for key in ("au_pro@0.05", "seg_f1"):
                cells.append(_fmt(_mean([x.get(key) for x in sel])) if sel else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### Per dataset", ""]
    lines.append(
        "| dataset | detector | " + " | ".join(h for _, h in METRICS) + " | fit s | predict x trunk | peak RSS |"
    )
    lines.append("|---" * (len(METRICS) + 5) + "|")
    for n in names:
        for m in models:
            r = next((r for r in rows if r["dataset"] == n and r["row"] == m), None)
            if r is None:
                continue
            x = _metrics(r)
            ratio = r.get("ratio_b1")
            lines.append(
                f"| {n} | {m} | "
                + " | ".join(_fmt(x.get(k)) for k, _ in METRICS)
                + f" | {r['fit_s']:.0f} | {'n/a' if ratio is None else f'{ratio:.1f}'} | {r['peak_rss_mb']:.0f} |"
            )
    choice_rows = [r for r in rows if r.get("branches")]
    if choice_rows:
        lines += [
            "",
            "### Branch choice",
            "",
            "Chosen on validation data only (criterion in parentheses, per candidate); 'best on test' is the branch "
            "with the higher test AU-PRO@0.05 / SegF1 @own among the hybrid's own fitted branches, each calibrated "
            "as the row was.",
            "",
            "| dataset | row | chosen | criterion on the selection data | best on test by AU-PRO@0.05 / SegF1 "
            "| choice was best | branches on test: AU-PRO@0.05 / SegF1 @own |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in choice_rows:
            info = r["branches"]
            choice, tested = info["choice"], info["tested"]
            crit = choice["criterion"]
            evidence = ", ".join(f"{k} {_fmt(v.get(crit))}" for k, v in choice["candidates"].items())
            best = [_best(tested, key) for key in HINDSIGHT]
            chosen = choice["chosen"]
            verdict = "/".join("yes" if b == chosen else "no" for b in best) if chosen in tested else "fused"
            on_test = ", ".join(
                f"{a} {_fmt(t['metrics'].get('au_pro@0.05'))} / {_fmt(t['metrics'].get('seg_f1'))}"
                for a, t in tested.items()
            )
            lines.append(
                f"| {r['dataset']} | {r['row']} | {chosen} | ({crit}) {evidence} | {' / '.join(map(str, best))} "
                f"| {verdict} | {on_test} |"
            )
    return "\n".join(lines) + "\n"


def merge_rows(
    rows: list[dict[str, Any]], resumed: list[dict[str, Any]], planned: set[tuple[str, str]]
) -> list[dict[str, Any]]:
    """This run's rows and the resumed report's rows outside its plan (measured by an earlier command), in
    the section's order: detector by detector, datasets in their order."""
    kept = [r for r in resumed if (r["dataset"], r["row"]) not in planned]
    names = [d["name"] for d in datasets()]
    return sorted(rows + kept, key=lambda r: (list(MODELS).index(r["row"]), names.index(r["dataset"])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"Produce the '{SECTION}' section of BENCHMARKS.md (issue 13's list).")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated rows (default {','.join(MODELS)})")
    p.add_argument("--datasets", default="all", help="comma-separated datasets or groups (bottle, bottle-tiled, piped)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / f"{SECTION}.json"), help="the JSON report")
    p.add_argument("--markdown", default=None, help=f"also write the '{SECTION}' section of this file")
    p.add_argument("--resume", metavar="JSON", help="reuse the rows of an interrupted run's report")
    p.add_argument(
        "--redo", default="", help="with --resume: measure these rows again (comma-separated ROW or ROW@GROUP)"
    )
    p.add_argument("--render", metavar="JSON", help="only write the table of an earlier run's JSON report")
    p.add_argument("--dry-run", action="store_true", help="list the rows and exit")
    a = p.parse_args(argv)
    if a.render:
        text = render(json.loads(Path(a.render).read_text()))
        print(text)
        if a.markdown:
            _write_section(Path(a.markdown), text)
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"hybrid section: unknown row(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    wanted = set(a.datasets.split(","))
    chosen = [d for d in datasets() if "all" in wanted or d["name"] in wanted or d["group"] in wanted]
    if not chosen:
        raise SystemExit(f"hybrid section: no dataset matches {a.datasets!r}")
    plan = [(m, d, *row_settings(m, d)) for m in models for d in chosen]  # detector-major: whole detectors first
    if a.dry_run:
        for m, d, detector, settings in plan:
            print(d["name"], m, detector, settings)
        return 0
    import torch

    from anomnet.bench import _cpu_name, _run_worker
    from anomnet.imageio import atomic_write_text

    earlier: dict[str, Any] = json.loads(Path(a.resume).read_text()) if a.resume else {}
    redo = {m for m in a.redo.split(",") if m}
    resumed: list[dict[str, Any]] = [
        r for r in earlier.get("rows", []) if r["row"] not in redo and f"{r['row']}@{r['group']}" not in redo
    ]
    start, loads, rows = time.perf_counter(), [os.getloadavg()[0]], []
    loads += [earlier[k] for k in ("load_min", "load_max") if k in earlier]
    started = earlier.get("started") or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/hybrid.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    work = tempfile.mkdtemp(prefix="anomnet-hybrid-")
    trunks: dict[tuple[str, int], dict[str, Any]] = {}

    def report() -> dict[str, Any]:
        return {
            "command": command,
            # a resumed run keeps the earlier run's rows outside its own plan, and names the earlier commands
            "commands": [*earlier.get("commands", [earlier["command"]] if "command" in earlier else []), command],
            "started": started,
            "cpu": _cpu_name(),
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "seconds": earlier.get("seconds", 0.0) + time.perf_counter() - start,
            "load_min": min(loads),
            "load_max": max(loads),
            "rows": rows,
        }

    try:
        for m, d, detector, settings in plan:
            done = next(
                (r for r in resumed if r["dataset"] == d["name"] and r["row"] == m and r["settings"] == settings), None
            )
            if done is not None:
                rows.append(done)
                continue
            print(f"[hybrid section] {d['name']}: {m}", file=sys.stderr, flush=True)
            spec = {
                "name": f"{d['name']}-{m}",
                "model": detector,
                "settings": settings,
                "data": d["path"],
                "category": None,
                "out": str(Path(work) / f"{d['name']}-{m}"),
                "rescore": RESCORE,
            }
            res = _run_worker("detector", spec)
            shutil.rmtree(spec["out"], ignore_errors=True)
            loads.append(os.getloadavg()[0])
            if "trunk_ms_b1" not in res:  # tiled: against one trunk pass at the input size, timed once per size
                key = trunk_key(detector, settings)
                if key not in trunks:
                    trunks[key] = _run_worker("backbone", {"backbone": key[0], "image_size": key[1], "data": d["path"]})
                res["trunk_ms_b1"] = trunks[key]["trunk_ms_b1"]
            res["ratio_b1"] = res["predict_ms_b1"] / res["trunk_ms_b1"]
            rows.append(
                {"dataset": d["name"], "group": d["group"], "row": m, "detector": detector, "settings": settings, **res}
            )
            atomic_write_text(a.out, json.dumps(report(), indent=2, default=str))  # partial results survive
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows[:] = merge_rows(rows, resumed, {(d["name"], m) for m, d, _, _ in plan})
    final = {**report(), "complete": True}
    atomic_write_text(a.out, json.dumps(final, indent=2, default=str))
    text = render(final)
    print(text)
    if a.markdown:
        _write_section(Path(a.markdown), text)
    return 0


def _write_section(markdown: Path, text: str) -> None:
    from anomnet.bench import write_section

    write_section(markdown, SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
