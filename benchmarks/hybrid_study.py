"""The hybrid's choices, measured (docs/hybrid.md): which selection data and criterion pick the branch that is
best on the test set, and whether the fused map beats the better single branch.

Per dataset the branches are fitted once (a hybrid in ``mode=auto``); then the candidates (each branch, and
the fused map) are measured on the selection data of every synthetic generator, and each candidate is
calibrated on the good validation images and evaluated on the test split. For every generator x criterion
the choice is compared with the candidate that was best on the test set (regret = the best candidate's test
metric minus the chosen one's)::

    python benchmarks/hybrid_study.py --datasets piped,bottle --branches inpformer,cpr \\
        --out benchmarks/hybrid-study.json --keep runs/hybrid-study

Accuracy only (no timing): it may run on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid import BOTTLE  # noqa: E402
from suite import PIPED, PIPED_CLASSES  # noqa: E402

# synthetic defects of the selection data: generator, "@anywhere" = not only on the object
GENERATORS = ("realistic", "realistic@anywhere", "perlin", "cutpaste", "noise", "noise@anywhere")
TEST_METRICS = ("au_pro@0.05", "seg_f1", "pixel_f1_max", "image_auroc")


def dataset_paths(names: str) -> list[tuple[str, str]]:
    every = [(c, str(PIPED / c)) for c in PIPED_CLASSES] + [("bottle", str(BOTTLE))]
    wanted = set(names.split(","))
    return [(n, p) for n, p in every if "all" in wanted or n in wanted or (n.startswith("PA_") and "piped" in wanted)]


def study_dataset(path: str, settings: dict[str, str], generators: list[str], keep: Path | None) -> dict[str, Any]:
    """Fit (or, with ``keep`` holding it, load) the hybrid; measure every generator's choice and every candidate."""
    from dataclasses import replace

    from anomnet.data import load_dataset
    from anomnet.decisions.calibrate import calibrate_detector
    from anomnet.detectors import Detector, create_detector
    from anomnet.detectors.hybrid import FUSED, Hybrid, evaluate_candidates
    from anomnet.detectors.hybrid.selection import make_generator, synthetic_batches
    from anomnet.evaluation.evaluate import evaluate

    split = load_dataset(path)
    if keep is not None and (keep / "anomnet.json").is_file():
        det = Detector.load(keep)
    else:
        det = create_detector("hybrid", {**settings, "mode": "auto", "keep_branches": "true"})
        assert isinstance(det, Hybrid)
        det.fit(split.train, split.validation, progress=False)
        if keep is not None:
            det.save(keep)
    assert isinstance(det, Hybrid)
    branches = det.fitted_branches()
    c = det.config
    evidence: dict[str, Any] = {}
    for gen in generators:
        kind, _, where = gen.partition("@")
        variant = replace(c, synthetic=kind, synthetic_where=where or "object")
        batches = synthetic_batches(
            split.validation, make_generator(variant), c.synthetic_per_image, c.seed, c.batch_size
        )
        evidence[gen], _, _ = evaluate_candidates(branches, batches, c.select_side, det.model.norms)
    tested: dict[str, dict[str, float]] = {}
    for name, branch in branches.items():
        calibrate_detector(branch, split.validation)
        tested[name] = evaluate(branch, split.test, progress=False).metrics
    det.model.used, det.model.fused = list(branches), True
    calibrate_detector(det, split.validation)
    tested[FUSED] = evaluate(det, split.test, progress=False).metrics
    return {"evidence": evidence, "tested": tested, "validation_images": len(split.validation)}


def summarise(results: dict[str, Any], criteria: list[str], with_fused: bool) -> list[dict[str, Any]]:
    """Per generator x criterion: how often the choice was the test-best candidate, and the mean regret."""
    from anomnet.detectors.hybrid import FUSED, choose

    out = []
    gens = list(next(iter(results.values()))["evidence"])
    for gen in gens:
        for crit in criteria:
            regrets: dict[str, list[float]] = {m: [] for m in ("au_pro@0.05", "seg_f1")}
            hits: dict[str, int] = {m: 0 for m in regrets}
            for r in results.values():
                cands = {k: v for k, v in r["evidence"][gen].items() if with_fused or k != FUSED}
                chosen = choose(cands, crit)
                for m in regrets:
                    values = {k: r["tested"][k][m] for k in cands}
                    best = max(values, key=lambda k: values[k])
                    regrets[m].append(values[best] - values[chosen])
                    hits[m] += int(chosen == best)
            out.append(
                {
                    "generator": gen,
                    "criterion": crit,
                    "with_fused": with_fused,
                    **{f"best_{m}": hits[m] for m in regrets},
                    **{f"regret_{m}": statistics.mean(v) for m, v in regrets.items()},
                    "datasets": len(results),
                }
            )
    return out


def render(report: dict[str, Any]) -> str:
    from anomnet.detectors.hybrid import FUSED

    results = report["results"]
    n = len(results)
    lines = [
        f"Command: `{report['command']}` ({report['date']}); branches: {report['branches']}.",
        "",
        "Test metrics of each candidate (calibrated on the good validation images):",
        "",
        "| dataset | " + " | ".join(f"{c} AU-PRO@0.05 / SegF1" for c in next(iter(results.values()))["tested"]) + " |",
        "|---" * (1 + len(next(iter(results.values()))["tested"])) + "|",
    ]
    for name, r in results.items():
        cells = [f"{100 * v['au_pro@0.05']:.2f} / {100 * v['seg_f1']:.2f}" for v in r["tested"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    beats = {
        m: sum(
            r["tested"][FUSED][m] > max(v[m] for k, v in r["tested"].items() if k != FUSED) for r in results.values()
        )
        for m in ("au_pro@0.05", "seg_f1")
    }
    lines += [
        "",
        f"Fused map above the better single branch on the test set: AU-PRO@0.05 in {beats['au_pro@0.05']} of {n} "
        f"datasets, SegF1 in {beats['seg_f1']} of {n}.",
        "",
        "Choice on the selection data vs the test-best candidate (regret: the test-best candidate's metric minus the "
        "chosen one's, mean over datasets, points):",
        "",
        "| generator | criterion | candidates | chose the best by AU-PRO@0.05 | regret AU-PRO@0.05 | chose the best by "
        "SegF1 | regret SegF1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        lines.append(
            f"| {s['generator']} | {s['criterion']} | {'branches + fused' if s['with_fused'] else 'branches'} | "
            f"{s['best_au_pro@0.05']} of {s['datasets']} | {100 * s['regret_au_pro@0.05']:.2f} | "
            f"{s['best_seg_f1']} of {s['datasets']} | {100 * s['regret_seg_f1']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure the hybrid's selection data, criterion and fusion.")
    p.add_argument("--datasets", default="piped,bottle", help="dataset names or groups (piped, bottle, all)")
    p.add_argument("--branches", default="patchcore,anomnet", help="the hybrid's branches")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more hybrid settings")
    p.add_argument("--generators", default=",".join(GENERATORS))
    p.add_argument("--out", required=True, help="JSON report (written after every dataset)")
    p.add_argument("--resume", action="store_true", help="keep the datasets already in --out")
    p.add_argument("--keep", default=None, help="save each fitted hybrid (all branches) here; reuse one found there")
    a = p.parse_args(argv)
    from anomnet.detectors.hybrid import METRICS
    from anomnet.imageio import atomic_write_text

    settings = {"branches": a.branches, **dict(kv.split("=", 1) for kv in a.set)}
    out = Path(a.out)
    results: dict[str, Any] = json.loads(out.read_text())["results"] if a.resume and out.is_file() else {}
    command = "python benchmarks/hybrid_study.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    report: dict[str, Any] = {}
    for name, path in dataset_paths(a.datasets):
        if name not in results:
            print(f"[hybrid study] {name}", file=sys.stderr, flush=True)
            keep = Path(a.keep) / name if a.keep else None
            results[name] = study_dataset(path, settings, a.generators.split(","), keep)
        summary = summarise(results, list(METRICS), False) + summarise(results, ["au_pro@0.05"], True)
        report = {
            "command": command,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "branches": a.branches,
            "settings": settings,
            "results": results,
            "summary": summary,
        }
        atomic_write_text(out, json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
