"""EfficientAD's local map kinds on the same fitted models: ``st_map`` squared, normalized and normalized_raw.

For each dataset one EfficientAD fit (the defaults plus ``--set`` settings, 10 % of the good images held out),
then the test split scored with each ``st_map`` kind (``anomnet.bench.rescore``: thresholds recalibrated on the
held-out images), and the metrics of each kind::

    python benchmarks/efficientad_maps.py --set image_size=128 --set steps=100 \\
        --data ../shared/datasets/piped/PA_BTN01_RL --data ../shared/datasets/piped/PA_FVN01_TL \\
        --out effad-maps.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

KINDS = ("squared", "normalized", "normalized_raw")
METRICS = ("image_auroc", "pixel_auroc", "au_pro@0.3", "au_pro@0.05", "seg_f1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, help="a dataset folder (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an EfficientAD setting")
    p.add_argument("--out", default=None, help="write the JSON report here")
    a = p.parse_args(argv)

    from anomnet.bench import rescore
    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector

    settings = dict(kv.split("=", 1) for kv in a.set)
    rows = []
    for data in a.data:
        split = load_dataset(data)
        det = create_detector("efficientad", settings)
        t = time.perf_counter()
        det.fit(split.train, split.validation, progress=False)
        fit_s = time.perf_counter() - t
        for kind in KINDS:
            metrics = rescore(det, split, {"st_map": kind})
            rows.append({"data": data, "st_map": kind, "fit_s": fit_s, "metrics": metrics})
            print(Path(data).name, f"{kind:15s}", " ".join(f"{k} {100 * metrics[k]:6.2f}" for k in METRICS), flush=True)
    for kind in KINDS:
        sel = [r["metrics"] for r in rows if r["st_map"] == kind]
        print(f"mean {kind:15s}", " ".join(f"{k} {100 * sum(m[k] for m in sel) / len(sel):6.2f}" for k in METRICS))
    if a.out:
        report = {
            "command": "python benchmarks/efficientad_maps.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": settings,
            "load_average": os.getloadavg()[0],
            "rows": rows,
        }
        Path(a.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
