"""Stress variants of the public sets for the benchmark suite, made reproducibly (seeded).

* ``rotated``: every image of a class (train and test alike) turned by its own random angle
  in [0, 360) degrees and cut to the largest centred square without empty corners; masks turned
  and cut the same way (nearest neighbour). A part whose pose varies on the line.
* ``crops``: every image cut to a random window whose width and height are drawn independently
  from [0.4, 1] of the side; a defective image's window always holds its defect's centre. A
  square resize then stretches each image differently: crops of varying size and aspect ratio.
* ``strips``: every image cut to a window of its full height and 40 % of its width (a 2.5 : 1
  upright strip, as KolektorSDD's 500 x 1250 images) at a random place; a defective image's window
  holds its defect's centre. Every image has the same oblong shape.

Each variant is written in the MVTec layout under ``OUT/NAME`` (``train/good``, ``test/*``,
``ground_truth/*``)::

    python benchmarks/stress.py --source ../shared/datasets/piped/PA_BTN01_RL --kind rotated --out runs/stress

The output is a pure function of the source images, the kind and the seed; an existing variant
folder is reused when its recorded recipe matches, so the suite does not rewrite it every run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("rotated", "crops", "strips")
STRIP_WIDTH = 0.4  # of the source's width; the strip keeps the full height
RECIPE = ".stress.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _rotate(img: Image.Image, angle: float, resample: Image.Resampling) -> Image.Image:
    w, h = img.size
    out = img.rotate(angle, resample=resample, expand=False)
    # the largest axis-aligned square inside the turned w x h rectangle (for w == h: side / (|cos| + |sin|))
    a = math.radians(angle % 90.0)
    side = int(min(w, h) / (math.cos(a) + math.sin(a)))
    left, top = (w - side) // 2, (h - side) // 2
    return out.crop((left, top, left + side, top + side))


def _crop_box(size: tuple[int, int], rng: np.random.Generator, centre: tuple[int, int] | None) -> tuple[int, ...]:
    w, h = size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    if centre is None:
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    else:  # a window that holds the defect's centre
        cx, cy = centre
        left = int(rng.integers(max(0, cx - cw + 1), min(cx, w - cw) + 1))
        top = int(rng.integers(max(0, cy - ch + 1), min(cy, h - ch) + 1))
    return left, top, left + cw, top + ch


def _strip_box(size: tuple[int, int], rng: np.random.Generator, centre: tuple[int, int] | None) -> tuple[int, ...]:
    w, h = size
    cw = max(1, round(w * STRIP_WIDTH))
    lo, hi = (0, w - cw) if centre is None else (max(0, centre[0] - cw + 1), min(centre[0], w - cw))
    left = int(rng.integers(lo, hi + 1))
    return left, 0, left + cw, h


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def _mask_of(source: Path, defect: str, image: Path) -> Path | None:
    gt = source / "ground_truth" / defect
    for cand in (gt / f"{image.stem}_mask.png", gt / f"{image.stem}.png"):
        if cand.is_file():
            return cand
    return None


def make_variant(source: Path, kind: str, out: Path, seed: int = 0) -> Path:
    """Write the ``kind`` variant of the MVTec-layout class ``source`` to ``out/<class>-<kind>``; return it."""
    if kind not in KINDS:
        raise SystemExit(f"stress: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not (source / "train" / "good").is_dir():
        raise SystemExit(f"stress: {source} is not an MVTec-layout class (no train/good)")
    target = out / f"{source.name}-{kind}"
    recipe = {"source": str(source.resolve()), "kind": kind, "seed": seed, "version": 1}
    if (target / RECIPE).is_file() and json.loads((target / RECIPE).read_text()) == recipe:
        return target
    staging = out / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    rng = np.random.default_rng(seed)
    jobs: list[tuple[Path, Path, Path | None, Path | None]] = []
    for img in _images(source / "train" / "good"):
        jobs.append((img, staging / "train" / "good" / img.name, None, None))
    for folder in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        for img in _images(folder):
            mask = None if folder.name == "good" else _mask_of(source, folder.name, img)
            mask_out = None if mask is None else staging / "ground_truth" / folder.name / mask.name
            jobs.append((img, staging / "test" / folder.name / img.name, mask, mask_out))
    for img_path, img_out, mask_path, mask_out in jobs:
        img = Image.open(img_path)
        img.load()
        mask = None
        if mask_path is not None:
            mask = Image.open(mask_path).convert("L")
            mask.load()
        if kind == "rotated":
            angle = float(rng.uniform(0.0, 360.0))
            img = _rotate(img, angle, Image.Resampling.BILINEAR)
            mask = None if mask is None else _rotate(mask, angle, Image.Resampling.NEAREST)
        else:
            centre = None
            if mask is not None:
                ys, xs = np.nonzero(np.asarray(mask) > 127)
                if len(xs):
                    centre = (int(np.median(xs)), int(np.median(ys)))
            box = (_crop_box if kind == "crops" else _strip_box)(img.size, rng, centre)
            img = img.crop(box)
            mask = None if mask is None else mask.crop(box)
        img_out.parent.mkdir(parents=True, exist_ok=True)
        img.save(img_out.with_suffix(".png"))
        if mask is not None and mask_out is not None:
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            mask.save(mask_out.with_suffix(".png"))
    (staging / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a seeded stress variant of an MVTec-layout class.")
    p.add_argument("--source", required=True, help="an MVTec-layout class folder (train/good, test/*, ground_truth/*)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="folder that receives <class>-<kind>/")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_variant(Path(a.source), a.kind, Path(a.out), a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
