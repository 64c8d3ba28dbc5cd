"""AnomNet's centroid count on the suite's most varied normal data: ELPV (300 seeded cells, as the suite fits them),
and on the PIPED classes (``--dataset piped/PA_BDP01_TL``: a folder under ../shared/datasets, 10 % held out).

Each SPEC is a comma-separated list of settings (empty: the defaults); per spec one fit with hold-out calibration,
then image AUROC on the test images (and AU-PRO@0.3 where masks exist), the fit's phases and the centroid count K.
Rows are appended to the JSON (a dataset and spec already there are skipped: resumable)::

    python benchmarks/anomnet_centroids.py --out benchmarks/anomnet-centroids.json "" \\
        centroid_init=coreset,centroid_ratio=0.02 \\
        centroid_init=coreset,centroid_ratio=0.02,stage1_epochs=0,stage2_epochs=0 \\
        centroid_init=coreset,centroid_ratio=0.1,stage1_epochs=0,stage2_epochs=0
    python benchmarks/anomnet_centroids.py --out benchmarks/anomnet-centroids.json \
        centroid_init=coreset,centroid_ratio=0.1
    for c in PA_BDP01_TL PA_BFT01_TL PA_BRG01_RL PA_BRG03_TL PA_BTN01_RL PA_FLR01_TL PA_FVN01_TL PA_FVN02_RL; do
        python benchmarks/anomnet_centroids.py --out benchmarks/anomnet-centroids.json --dataset piped/$c \
            centroid_init=coreset,centroid_ratio=0.1 ""
    done

(the recorded PIPED rows ran four classes at a time in two processes with their own --out, rows merged).

Fit times depend on the machine's load; the JSON records the load average before each row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON list of rows (appended to)")
    p.add_argument("--model", default="anomnet")
    p.add_argument("--dataset", default="elpv", help="elpv, or a folder under ../shared/datasets")
    p.add_argument("specs", nargs="*", help="settings per row, KEY=VALUE,KEY=VALUE ('' = defaults)")
    a = p.parse_args(argv)
    print(" ".join(["python", "benchmarks/anomnet_centroids.py", *map(shlex.quote, argv)]), flush=True)
    from anomnet import api
    from anomnet.data import DatasetSplit, load_dataset
    from anomnet.evaluation.evaluate import evaluate

    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    for spec in a.specs:
        if any(r["spec"] == spec and r["model"] == a.model and r.get("dataset", "elpv") == a.dataset for r in rows):
            continue
        settings = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        if a.dataset == "elpv":
            split = load_dataset("elpv")
            train = sorted(random.Random(0).sample(split.train, 300), key=lambda s: str(s.path))
            whole = DatasetSplit(split.name, train, split.validation, split.test)
        else:
            whole = load_dataset(str(SHARED / a.dataset), val_fraction=0.1)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        det = api.fit(a.model, whole, None, settings=settings, calibration="holdout", progress=False)
        fit_s = time.perf_counter() - t
        res = evaluate(det, whole.test, progress=False)
        centroids = getattr(det.model, "centroids", None)
        row = {
            "dataset": a.dataset,
            "model": a.model,
            "spec": spec,
            "fit_s": round(fit_s, 1),
            "load_avg_before": load,
            "image_auroc": res.metrics["image_auroc"],
            "au_pro@0.3": res.metrics.get("au_pro@0.3"),
            "phases": {ph.name: round(ph.seconds, 1) for ph in det.fit_record.phases},
            "k": int(centroids.shape[0]) if centroids is not None else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
