"""Do the stated false-alarm rates hold? Calibration by hold-out, leave-one-out and cross-fitting, measured.

Writes ``benchmarks/decisions.json`` and the ``decisions`` section of BENCHMARKS.md::

    python benchmarks/decisions.py                          # the recorded run
    python benchmarks/decisions.py --datasets PA_BDP01_TL --sources holdout,loo \\
        --out /tmp/d.json --markdown /tmp/d.md               # a quick check of the driver
    python benchmarks/decisions.py --dry-run                 # print the command only

For each dataset (MVTec AD bottle, the eight PIPED classes, ELPV as the demo fits it, and KolektorSDD
and MPDD metal_plate where ``../shared/datasets`` holds them) and each calibration source, the detector
is fitted at its defaults and its test images scored once; then for each asked false-alarm rate
(1 %, 5 %, 10 %) the conformal threshold is taken from that source's calibration scores and applied:

* test false-alarm rate (good test images flagged) with its 95 % Clopper-Pearson interval,
* recall (defective test images flagged),
* the oracle recall at the same test false-alarm rate: the best recall any threshold gets on this test set
  with no more false alarms -- what the ranking allowed.

Sources: ``holdout`` (fit on 90 % of the good training images, calibrate on the other 10 %; ELPV: its
fixed 151 validation cells), ``loo`` (memory-bank detectors: fit on all, each training image scored without
its own bank patches, pooled with any held-out images), ``crossfit`` (the final model fitted on all,
calibrated on out-of-fold scores of 5 folds). PatchCore's fit is deterministic, so its loo and crossfit rows
share the final model's test scores. ``--model anomnet`` measures a detector that trains (holdout, crossfit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PIPED_CLASSES  # noqa: E402  (the suite's PIPED classes)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
SECTION = "decisions"
PIPED = list(PIPED_CLASSES)
# name -> dataset path (relative to ../shared/datasets) or "elpv"
DATASETS: dict[str, str] = {
    "bottle": "mvtec_ad/bottle",
    **{c: f"piped/{c}" for c in PIPED},
    "elpv": "elpv",
    "kolektorsdd": "kolektorsdd",
    "mpdd-metal_plate": "mpdd/metal_plate",
}
RATES = (0.01, 0.05, 0.10)
DEFAULT_RATE = 0.01
ELPV_TRAIN = 300  # as the demo fits it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stated vs measured false-alarm rates of each calibration source.")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated names (default: all)")
    p.add_argument("--sources", default="holdout,loo,crossfit", help="calibration sources (default all three)")
    p.add_argument(
        "--crossfit-on", default="bottle,piped", help="datasets measured with crossfit (folds cost fits): bottle,piped"
    )
    p.add_argument("--model", default="patchcore", help="detector at its defaults (default patchcore)")
    p.add_argument("--folds", type=int, default=5, help="folds of crossfit (default 5)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / f"{SECTION}.json"), help="the JSON report")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file whose section is replaced")
    p.add_argument("--resume", action="store_true", help="keep the rows of --out already measured")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


def command_line(argv: list[str]) -> str:
    return " ".join(["python", "benchmarks/decisions.py", *map(shlex.quote, argv)])


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a rate ``k / n``."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def oracle_recall(good: np.ndarray, bad: np.ndarray, false_alarms: int) -> float:
    """Best recall of any threshold that flags at most ``false_alarms`` of the good scores."""
    if bad.size == 0:
        return math.nan
    g = np.sort(good)[::-1]
    if false_alarms >= g.size:
        return 1.0
    return float(np.mean(bad > g[false_alarms]))


def operating_point(cal_scores: np.ndarray, rate: float, good: np.ndarray, bad: np.ndarray) -> dict[str, Any]:
    """The conformal threshold at ``rate`` on ``cal_scores`` applied to the test scores."""
    from anomnet.decisions.calibration import calibrate

    cal = calibrate(cal_scores, rate)
    fa = int(np.count_nonzero(good >= cal.threshold))
    hit = int(np.count_nonzero(bad >= cal.threshold))
    low, high = clopper_pearson(fa, good.size)
    return {
        "asked": rate,
        "threshold": cal.threshold,
        "supported": cal.achieved_false_alarm,
        "false_alarms": fa,
        "good": int(good.size),
        "false_alarm_rate": fa / good.size if good.size else math.nan,
        "false_alarm_ci95": [low, high],
        "caught": hit,
        "defective": int(bad.size),
        "recall": hit / bad.size if bad.size else math.nan,
        "oracle_recall": oracle_recall(good, bad, fa),
    }


def _test_scores(det: Any, test: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    from anomnet.evaluation.evaluate import run_predictions

    scores, labels = [], []
    for batch, pred in run_predictions(det, test, int(det.config.batch_size)):
        scores.extend(pred.scores.tolist())
        labels.extend(s.label for s in batch.samples)
    s, y = np.asarray(scores), np.asarray(labels)
    return s[y == 0], s[y == 1]


def measure(name: str, where: str, sources: list[str], model: str, folds: int) -> dict[str, Any]:
    """Every source's calibration scores and operating points on one dataset."""
    from anomnet import api
    from anomnet.data import DatasetSplit, load_dataset
    from anomnet.decisions.calibrate import out_of_fold_statistics
    from anomnet.detectors import create_detector

    path = where if where == "elpv" else str(SHARED / where)
    row: dict[str, Any] = {"dataset": name, "path": where, "model": model, "sources": {}}
    t0 = time.perf_counter()
    if where == "elpv":
        split = load_dataset("elpv")
        import random

        train = sorted(random.Random(0).sample(split.train, ELPV_TRAIN), key=lambda s: str(s.path))
        whole = DatasetSplit(split.name, train, split.validation, split.test)
        held = whole  # ELPV's validation cells are its own: the hold-out model is the same model
    else:
        whole = load_dataset(path, val_fraction=0.0)
        held = load_dataset(path, val_fraction=0.1)
    row["train_images"] = len(whole.train)
    probe = create_detector(model)
    can_loo = probe.can_leave_out
    sources = [s for s in sources if s != "loo" or can_loo]
    final = None
    good = bad = np.zeros(0)
    if can_loo and (set(sources) & {"loo", "crossfit"} or where == "elpv"):
        # a detector whose fit needs held-out images (the hybrid's choice) keeps them; they calibrate too
        base = held if probe.needs_validation else whole
        final = api.fit(model, base, None, calibration="loo", progress=False)
    elif "crossfit" in sources:  # a detector that trains: fit's own cross-fitting, then the final model on all
        final = api.fit(model, whole, None, calibration="crossfit", folds=folds, progress=False)
    elif where == "elpv":
        final = api.fit(model, whole, None, calibration="holdout", progress=False)
    if final is not None:
        good, bad = _test_scores(final, whole.test)
        row["suspects"] = final.calibration.suspects
    for source in sources:
        t = time.perf_counter()
        if source == "holdout":
            if where == "elpv":
                assert final is not None
                det, cal_scores = final, _holdout_scores(final, whole)
                g, b = good, bad
            else:
                det = api.fit(model, held, None, calibration="holdout", progress=False)
                cal_scores = np.asarray(det.calibration.validation_scores)
                g, b = _test_scores(det, held.test)
        elif source == "loo":
            assert final is not None
            cal_scores, g, b = np.asarray(final.calibration.validation_scores), good, bad
        elif not can_loo:
            assert final is not None and final.calibration.source == "crossfit"
            cal_scores, g, b = np.asarray(final.calibration.validation_scores), good, bad
        else:
            assert final is not None
            make = lambda: create_detector(model, {"seed": 0})  # noqa: E731
            oof = out_of_fold_statistics(make, whole.train, whole.validation, folds, 0, per_image=1)
            extra = np.zeros(0)
            if whole.validation:  # held-out images pool with the out-of-fold scores, as in fit
                extra = _holdout_scores(final, whole)
            cal_scores, g, b = np.concatenate([oof.scores, extra]), good, bad
        row["sources"][source] = {
            "calibration_images": int(cal_scores.size),
            "calibration_scores": sorted(float(v) for v in cal_scores),
            "points": [operating_point(cal_scores, r, g, b) for r in RATES],
            "seconds": time.perf_counter() - t,
        }
        print(f"  {name} {source}: {_short(row['sources'][source]['points'][0])}", flush=True)
    row["seconds"] = time.perf_counter() - t0
    return row


def _holdout_scores(det: Any, split: Any) -> np.ndarray:
    from anomnet.decisions.calibrate import validation_pixel_statistics

    return validation_pixel_statistics(det, split.validation, per_image=1)[0]


def _short(p: dict[str, Any]) -> str:
    return (
        f"asked {p['asked']:g}: {p['false_alarms']}/{p['good']} false alarms, recall {p['caught']}/{p['defective']}, "
        f"oracle {100 * p['oracle_recall']:.1f} %"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    command = command_line(argv)
    print(command, flush=True)
    if a.dry_run:
        return 0
    from anomnet.bench import _cpu_name, write_section

    out = Path(a.out)
    old = json.loads(out.read_text()) if a.resume and out.is_file() else {}
    report: dict[str, Any] = {
        "command": command,
        "commands": [c for c in old.get("commands", [old["command"]] if old else []) if c != command] + [command],
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_before": os.getloadavg()[0],
        "rates": list(RATES),
        "default_rate": DEFAULT_RATE,
        "rows": [r for r in old.get("rows", [])],
        "absent": [n for n in old.get("absent", []) if n in DATASETS and not _present(DATASETS[n])],
    }
    done = {(r["dataset"], r["model"]) for r in report["rows"]}
    crossfit_on = set(a.crossfit_on.split(","))
    for name in [n for n in a.datasets.split(",") if n]:
        where = DATASETS[name]
        if not _present(where):
            report["absent"] = sorted({*report["absent"], name}, key=list(DATASETS).index)
            print(f"{name}: not present ({SHARED / where})", flush=True)
            continue
        if (name, a.model) in done:
            continue
        group = "piped" if name in PIPED else name
        sources = [s for s in a.sources.split(",") if s != "crossfit" or group in crossfit_on]
        print(f"{name}: {', '.join(sources)}", flush=True)
        report["rows"].append(measure(name, where, sources, a.model, a.folds))
        report["load_avg_after"] = os.getloadavg()[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every dataset: a resumable run
    report["pooled_piped"] = {m: pooled([r for r in report["rows"] if r["model"] == m]) for m in _models(report)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    print(text)
    write_section(Path(a.markdown), SECTION, text)
    return 0


def _present(where: str) -> bool:
    return where == "elpv" or (SHARED / where).is_dir()


def pooled(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per source and asked rate: false alarms, recall and oracle recall summed over the PIPED classes."""
    piped = [r for r in rows if r["dataset"] in PIPED]
    out: dict[str, list[dict[str, Any]]] = {}
    for source in ("holdout", "loo", "crossfit"):
        have = [r["sources"][source] for r in piped if source in r["sources"]]
        if len(have) != len(PIPED):
            continue
        points = []
        for i, rate in enumerate(RATES):
            ps = [h["points"][i] for h in have]
            fa, good = sum(p["false_alarms"] for p in ps), sum(p["good"] for p in ps)
            hit, bad = sum(p["caught"] for p in ps), sum(p["defective"] for p in ps)
            oracle = sum(p["oracle_recall"] * p["defective"] for p in ps)
            low, high = clopper_pearson(fa, good)
            points.append(
                {
                    "asked": rate,
                    "false_alarms": fa,
                    "good": good,
                    "false_alarm_ci95": [low, high],
                    "caught": hit,
                    "defective": bad,
                    "recall": hit / bad,
                    "oracle_recall": oracle / bad,
                }
            )
        out[source] = points
    return out


def _models(report: dict[str, Any]) -> list[str]:
    return sorted({r["model"] for r in report["rows"]}, key=lambda m: (m != "patchcore", m))


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def render(r: dict[str, Any]) -> str:
    lines = [
        f"## {SECTION}",
        "",
        "Command: "
        + ", then ".join(f"`{c}`" for c in r.get("commands", [r["command"]]))
        + f" (last run {r['date']}, {r['cpu']}, {r['cores']} cores, load {r['load_avg_before']:.1f} before; JSON: "
        f"`benchmarks/{SECTION}.json`). Each detector at its defaults; the conformal threshold at each "
        'asked false-alarm rate from each calibration source\'s scores. "used": the rate the calibration set '
        "supports (its finest is 1/(n+1)); false alarms on the good test images with the 95 % Clopper-Pearson "
        "interval; recall on the defective ones; oracle: the best recall any threshold reaches on this test set "
        "with no more false alarms.",
        "",
    ]
    pools = {m: p for m, p in r.get("pooled_piped", {}).items() if p}
    if pools:
        lines += [
            "Pooled over the eight PIPED classes (16 good and 48 defective test images each):",
            "",
            "| detector | calibration | asked | false alarms | 95 % interval | recall | oracle recall |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, pool in pools.items():
            for source, points in pool.items():
                for p in points:
                    lo, hi = p["false_alarm_ci95"]
                    lines.append(
                        f"| {model} | {source} | {100 * p['asked']:g} % | {p['false_alarms']}/{p['good']} | "
                        f"{_pct(lo)}-{_pct(hi)} % | {p['caught']}/{p['defective']} ({_pct(p['recall'])} %) | "
                        f"{_pct(p['oracle_recall'])} % |"
                    )
        lines.append("")
    lines += [
        "| detector | dataset | calibration | n | asked | used | false alarms (95 % interval) | recall "
        "| oracle recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(r["rows"], key=lambda row: _models(r).index(row["model"])):
        for source, s in row["sources"].items():
            for p in s["points"]:
                lo, hi = p["false_alarm_ci95"]
                lines.append(
                    f"| {row['model']} | {row['dataset']} | {source} | {s['calibration_images']} | "
                    f"{100 * p['asked']:g} % | "
                    f"{_pct(p['supported'])} % | {p['false_alarms']}/{p['good']} = {_pct(p['false_alarm_rate'])} % "
                    f"({_pct(lo)}-{_pct(hi)}) | {p['caught']}/{p['defective']} = {_pct(p['recall'])} % | "
                    f"{_pct(p['oracle_recall'])} % |"
                )
    suspects = [(row["dataset"], s) for row in r["rows"] for s in row.get("suspects", [])]
    lines += [
        "",
        "Suspect training images listed by the leave-one-out calibration (robust z > 5): "
        + (
            "; ".join(f"{d}: {Path(s['image']).name} (z {s['z']:.1f})" for d, s in suspects)
            if suspects
            else "none on these datasets."
        ),
    ]
    if r.get("absent"):
        lines.append(f"Not present on this machine: {', '.join(r['absent'])}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
