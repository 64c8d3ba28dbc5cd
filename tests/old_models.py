"""Model folders written by an earlier anomnet, kept to test that later versions still load them.

``tests/data/old_models/<detector>/`` holds a tiny model (64 px synthetic images, a few of them)
written with the code of the commit named in its ``scores.json``, with the scores that code gave
on :func:`fixed_input`. ``tests/test_state_module.py`` loads each folder and compares.

Write them again (only for a new set of old folders: the point is that they come from old code)::

    python -m tests.old_models [detector ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from tests.conftest import make_folder_dataset

ROOT = Path(__file__).resolve().parent / "data" / "old_models"
SIZE: dict[str, Any] = {"image_size": 64, "batch_size": 4, "seed": 0}
SETTINGS: dict[str, dict[str, Any]] = {
    "patchcore": SIZE,
    "tocoad": {
        **SIZE,
        "layers": "stage2,stage3",
        "train_batch_size": 2,
        "stage1_steps": 2,
        "stage2_steps": 2,
        "generator": "cutpaste",
    },
    "anomnet": {**SIZE, "stage1_epochs": 1, "stage2_epochs": 1, "num_centroids": 16},
    "cpr": {**SIZE, "train_batch_size": 2, "steps": 2, "train_crop": 32, "points": 20, "head_width": 8, "head_dim": 8},
    "inpformer": {
        **SIZE,
        "layers": "stage1,stage2",
        "steps": 2,
        "train_batch_size": 2,
        "decoder_depth": 4,
        "mlp_ratio": 1.0,
    },
    "hybrid": {
        **SIZE,
        "branches": "sharp:patchcore,smooth:patchcore",
        "smooth.blur_sigma": 8.0,
        "synthetic": "cutpaste",
        "synthetic_per_image": 1,
    },
}


def fixed_input() -> torch.Tensor:
    """``[4, 3, 64, 64]`` in [0, 1]: two good synthetic images and two with a defect, the same every time."""
    from anomnet.imageio import read_image

    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder_dataset(Path(tmp), n_train=0, n_good=2, n_bad=2, seed=7)
        files = sorted((root / "test" / "good").glob("*.png")) + sorted((root / "test" / "blob").glob("*.png"))
        return torch.stack([torch.from_numpy(read_image(f)).permute(2, 0, 1) for f in files])


def build(name: str) -> None:
    from anomnet.data import load_dataset
    from anomnet.detectors import create_detector

    out = ROOT / name
    with tempfile.TemporaryDirectory() as tmp:
        split = load_dataset(make_folder_dataset(Path(tmp) / "data", n_train=8, n_good=1, n_bad=1), val_fraction=0.25)
        det = create_detector(name, SETTINGS[name])
        det.fit(split.train, split.validation, progress=False)
        det.save(out)
    pred = det.predict(fixed_input())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    record = {
        "commit": commit,
        "settings": SETTINGS[name],
        "scores": [float(v) for v in pred.scores],
        "map_mean": float(pred.maps.mean()),
        "map_max": float(pred.maps.amax()),
    }
    (out / "scores.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    for detector in sys.argv[1:] or list(SETTINGS):
        build(detector)
        print(detector, "written")
