"""The README demo's levers on ELPV solar cells: one model for all cells or a model per cell type, backbone, size.

Run from the repository root (the command is stored in the JSON)::

    nice -n 10 python benchmarks/elpv_study.py --out benchmarks/elpv-study.json \\
        --variant 'default:all:300:' --variant 'per-type-150:type:150:' \\
        --variant 'lite1:all:300:backbone=efficientnet_lite1'

Each ``--variant NAME:ROUTE:TRAIN:KEY=VALUE;...`` fits PatchCore as the demo does (``api.fit`` on the
demo's split, ``anomnet.data.load_elpv``: leave-one-out calibration on the training cells pooled with
the 151 validation cells, 1 % false alarms asked) and scores the demo's 1,167 test cells.
``ROUTE`` ``all``: one model fitted on ``TRAIN`` training cells of both types (today's demo).
``ROUTE`` ``type``: the same split cut by the cell type ``labels.csv`` gives (mono / poly): one model
per type fitted on ``TRAIN`` of that type's training cells and calibrated on that type's training and
validation cells only; each test cell is scored by its own type's model. The two models' scores are
pooled for the one image AUROC in three ways (each recorded):

* ``p_value``: the conformal p-value of a cell's score against its own model's calibration scores
  (the principled pooling: each model is calibrated separately), ties (cells above every calibration
  score share the smallest p-value) broken by the score over its model's threshold;
* ``ratio``: the score over its model's threshold;
* ``raw``: the raw scores (the two models' scales need not agree).

Recall and false alarms are each cell's decision by its own model's threshold (the same for every
pooling). Fit seconds are wall time of fitting + calibrating on a shared 2-core machine (load 10+),
test seconds of scoring the test cells: compare them only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from anomnet import api
from anomnet.data import DatasetSplit, elpv_cell_types, load_elpv
from anomnet.evaluation.evaluate import evaluate
from anomnet.evaluation.metrics import false_alarm_rate, image_auroc, precision_recall_f1


def _variant(text: str) -> tuple[str, str, int, dict[str, str]]:
    name, route, train, rest = (text.split(":", 3) + [""] * 4)[:4]
    if route not in ("all", "type"):
        raise SystemExit(f"--variant {text!r}: ROUTE must be 'all' or 'type'")
    settings = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        settings[k.strip()] = v.strip()
    return name, route, int(train), settings


def _by_type(split: DatasetSplit, kind: str, types: dict[Path, str]) -> DatasetSplit:
    keep = lambda samples: [s for s in samples if types[s.path] == kind]  # noqa: E731
    return DatasetSplit(f"elpv/{kind}", keep(split.train), keep(split.validation), keep(split.test), [])


def _score_type(split: DatasetSplit, train: int, settings: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    det = api.fit("patchcore", split, None, settings=dict(settings), max_train=train, progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(det, split.test, progress=False)
    test_s = time.perf_counter() - t0
    cal = det.calibration
    return {
        "scores": np.asarray(res.scores, dtype=np.float64),
        "labels": np.asarray(res.labels, dtype=np.int64),
        "p": cal.p_values(res.scores),
        "threshold": float(cal.threshold),
        "calibration_cells": len(cal.validation_scores),
        "fit_s": fit_s,
        "test_s": test_s,
        "auroc": float(image_auroc(res.scores, res.labels)),
    }


def _summary(scores: np.ndarray, labels: np.ndarray, called: np.ndarray) -> dict[str, float]:
    bad, good = labels == 1, labels == 0
    return {
        "image_auroc": 100 * float(image_auroc(scores, labels)),
        "caught": int(called[bad].sum()),
        "defective": int(bad.sum()),
        "false_alarms": int(called[good].sum()),
        "good": int(good.sum()),
    }


def run_variant(split: DatasetSplit, types: dict[Path, str], text: str) -> dict[str, Any]:
    name, route, train, settings = _variant(text)
    row: dict[str, Any] = {"variant": name, "route": route, "train_per_model": train, "settings": settings}
    if route == "all":
        r = _score_type(split, train, settings)
        called = r["scores"] >= r["threshold"]
        row.update(_summary(r["scores"], r["labels"], called))
        row.update(fit_s=round(r["fit_s"], 1), test_s=round(r["test_s"], 1))
        thr = r["threshold"]
        _, rec, _ = precision_recall_f1(r["scores"], r["labels"], thr)
        row["recall_check"] = 100 * rec
        row["false_alarm_check"] = 100 * false_alarm_rate(r["scores"], r["labels"], thr)
        return row
    parts = {kind: _score_type(_by_type(split, kind, types), train, settings) for kind in ("mono", "poly")}
    labels = np.concatenate([parts[k]["labels"] for k in parts])
    raw = np.concatenate([parts[k]["scores"] for k in parts])
    ratio = np.concatenate([parts[k]["scores"] / parts[k]["threshold"] for k in parts])
    p = np.concatenate([parts[k]["p"] for k in parts])
    # -log p orders by p-value; the ratio (< 1 apart, scaled far below p's smallest step) breaks its ties
    by_p = -np.log(p) + 1e-6 * np.tanh(ratio)
    called = ratio >= 1.0
    row.update(_summary(by_p, labels, called))
    row["pooling"] = "p_value"
    row["image_auroc_ratio"] = 100 * float(image_auroc(ratio, labels))
    row["image_auroc_raw"] = 100 * float(image_auroc(raw, labels))
    row["image_auroc_p_untied"] = 100 * float(image_auroc(-np.log(p), labels))
    row["per_type"] = {
        k: {
            "image_auroc": 100 * v["auroc"],
            "test_cells": int(v["labels"].size),
            "calibration_cells": v["calibration_cells"],
            "threshold": v["threshold"],
            "fit_s": round(v["fit_s"], 1),
            "test_s": round(v["test_s"], 1),
        }
        for k, v in parts.items()
    }
    row["fit_s"] = round(sum(v["fit_s"] for v in parts.values()), 1)
    row["test_s"] = round(sum(v["test_s"] for v in parts.values()), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME:ROUTE:TRAIN:KEY=VALUE;...")
    ap.add_argument("--out", required=True, help="JSON report (rows are appended to an existing one)")
    args = ap.parse_args(argv)
    split = load_elpv()
    types = elpv_cell_types()
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    report.setdefault("commands", []).append(" ".join(["python", "benchmarks/elpv_study.py", *sys.argv[1:]]))
    for text in args.variant:
        t0 = time.perf_counter()
        row = run_variant(split, types, text)
        row["load_avg_1min_at_end"] = os.getloadavg()[0]
        row["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        report["rows"].append(row)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"{row['variant']:<16} AUROC {row['image_auroc']:.2f}  caught {row['caught']}/{row['defective']}  "
            f"false alarms {row['false_alarms']}/{row['good']}  fit {row['fit_s']} s  test {row['test_s']} s  "
            f"({time.perf_counter() - t0:.0f} s, load {row['load_avg_1min_at_end']:.1f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
