"""How far an exported model (exact search, float32) is from the in-memory model as ``anomnet predict`` runs it.

An export reproduces the model's *graph-mode* prediction (docs/export.md); the default in-memory
prediction differs where the model searches with faiss IVF cells (PatchCore / ToCoAD banks of at
least 10,000 patches) or runs in bfloat16 (EfficientAD where the CPU supports it). This script fits
(or reuses) models, scores every test image both ways and reports the score and map differences,
the decisions that flip at the model's threshold, and the image AUROC of each::

    python benchmarks/export_reference.py --data ../shared/datasets/mvtec_ad/bottle --work-dir runs/bench-export

It reuses the fitted models of ``benchmarks/export_bench.py`` (same ``--work-dir``, same budgets) or fits them
(``--max-train N``: on N training images; PatchCore's bank still passes the 10,000 patches where IVF starts at
N >= 25 for 256 px bottle images). Writes ``benchmarks/export_reference.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from anomnet.components.graph_mode import graph_mode
from anomnet.data import iter_batches, load_dataset
from anomnet.detectors.base import Detector
from anomnet.evaluation.metrics import image_auroc
from anomnet.imageio import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import BOTTLE, DEFAULT_SETTINGS, ROOT, _settings  # noqa: E402


def compare(det: Detector, data: str) -> dict[str, object]:
    split = load_dataset(data)
    scores: dict[str, list[float]] = {"default": [], "graph": []}
    map_rel: list[float] = []
    labels: list[int] = []
    for batch in iter_batches(list(split.test), 8):
        default = det.predict(batch.images)
        with graph_mode():
            graph = det.predict(batch.images)
        scores["default"] += default.scores.tolist()
        scores["graph"] += graph.scores.tolist()
        diff = (default.maps - graph.maps).abs().flatten(1).amax(1) / graph.maps.abs().flatten(1).amax(1)
        map_rel += diff.tolist()
        labels += [int(s.label) for s in batch.samples]
    d, g = np.array(scores["default"]), np.array(scores["graph"])
    rel = np.abs(d - g) / np.abs(g)
    cal = det.calibration
    nn = getattr(getattr(det, "model", None), "nn", None)
    return {
        "detector": det.name,
        "search": getattr(nn, "backend", None),
        "bank": None if nn is None else len(nn),
        "bf16": bool(getattr(det.config, "bf16", False)),
        "images": len(g),
        "score_rel_max": float(rel.max()),
        "score_rel_median": float(np.median(rel)),
        "map_rel_max": float(max(map_rel)),
        "decision_flips": int((cal.decide(d) != cal.decide(g)).sum()),
        "image_auroc_default": float(image_auroc(d, np.array(labels))),
        "image_auroc_graph": float(image_auroc(g, np.array(labels))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(BOTTLE))
    p.add_argument("--models", default="patchcore,efficientad")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-export"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "export_reference.json"))
    p.add_argument("--max-train", type=int, default=None, help="fit on at most this many training images (seeded)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL:KEY=VALUE;...", help="fit settings of a model")
    args = p.parse_args(argv)
    from anomnet import api

    rows = []
    for model in args.models.split(","):
        folder = Path(args.work_dir) / model
        if not (folder / "anomnet.json").is_file():
            extra = dict(item.split(":", 1) for item in args.set).get(model, "")
            settings = {**_settings(DEFAULT_SETTINGS.get(model, "")), **_settings(extra)}
            api.fit(model, args.data, out=folder, settings=settings, max_train=args.max_train, progress=False)
        row = compare(Detector.load(folder), args.data)  # (loaded outside inference mode: BatchNorm folding)
        print(json.dumps(row))
        rows.append(row)
    atomic_write_text(args.out, json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
