"""Stress variants of the public sets for the benchmark suite, made reproducibly (seeded).

* ``rotated``: every image of a class (train and test alike) turned by its own random angle
  in [0, 360) degrees and cut to the largest centred square without empty corners; masks turned
  and cut the same way (nearest neighbour). A part whose pose varies on the line.
* ``posed``: every image turned by its own random angle in [0, 360) degrees and then cut to a
  window of a fixed side (``POSED_SIDE`` of the source's shorter side) at a random place where
  the turned image covers it (no empty corners); a defective image's window holds its defect's
  centre. Pose and placement vary, the scale does not (``rotated`` cuts the largest centred
  square, so its scale follows the angle and the part stays centred). Masks turned and cut the
  same way (nearest neighbour).
* ``unseen-poses``: as ``posed``, but the training images are only placed (cut to the window at a
  random place, not turned): the test images come in poses the training images never show.
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

KINDS = ("rotated", "posed", "unseen-poses", "crops", "strips")
POSED_SIDE = 0.6  # the posed window, of the shorter side: it fits inside the image turned by any angle (< 0.707)
POSED_TRIES = 1000  # placements tried per angle, angles per image, before the fallback
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


def _crop_box(
    size: tuple[int, int], rng: np.random.Generator, centre: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    w, h = size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    if centre is None:
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    else:  # a window that holds the defect's centre
        cx, cy = centre
        left = int(rng.integers(max(0, cx - cw + 1), min(cx, w - cw) + 1))
        top = int(rng.integers(max(0, cy - ch + 1), min(cy, h - ch) + 1))
    return left, top, left + cw, top + ch


def _strip_box(
    size: tuple[int, int], rng: np.random.Generator, centre: tuple[int, int] | None
) -> tuple[int, int, int, int]:
    w, h = size
    cw = max(1, round(w * STRIP_WIDTH))
    lo, hi = (0, w - cw) if centre is None else (max(0, centre[0] - cw + 1), min(centre[0], w - cw))
    left = int(rng.integers(lo, hi + 1))
    return left, 0, left + cw, h


def _centre(mask: Image.Image | None) -> tuple[int, int] | None:
    """The defect's centre (median of its mask's pixels), or None without a mask or on an empty one."""
    if mask is None:
        return None
    ys, xs = np.nonzero(np.asarray(mask) > 127)
    return (int(np.median(xs)), int(np.median(ys))) if len(xs) else None


def _placement(
    covered: np.ndarray, side: int, rng: np.random.Generator, centre: tuple[int, int] | None
) -> tuple[int, int, int, int] | None:
    """A ``side`` square window at a random place whose corners (and 2 px beyond) the turned image covers,
    holding ``centre`` when given; None when no try found one."""
    h, w = covered.shape
    for _ in range(POSED_TRIES):
        if centre is None:
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        else:
            cx, cy = centre
            left = int(rng.integers(max(0, cx - side + 1), min(cx, w - side) + 1))
            top = int(rng.integers(max(0, cy - side + 1), min(cy, h - side) + 1))
        xs = (max(0, left - 2), min(w - 1, left + side + 1))
        ys = (max(0, top - 2), min(h - 1, top + side + 1))
        if all(covered[y, x] for y in ys for x in xs):  # the covered area is convex: corners inside, all inside
            return left, top, left + side, top + side
    return None


def _posed(
    img: Image.Image, mask: Image.Image | None, rng: np.random.Generator, turn: bool = True
) -> tuple[Image.Image, Image.Image | None, float, tuple[int, int, int, int]]:
    """``img`` (and ``mask``) turned by a random angle (``turn``; else not turned) and cut to a ``POSED_SIDE``
    window at a random covered place holding the defect's centre; the angle and the window. An angle that
    turns the defect out of the frame, or leaves no window for it, is drawn again; the last try is the
    unturned image."""
    w, h = img.size
    side = max(1, int(POSED_SIDE * min(w, h)))
    for attempt in range(POSED_TRIES):
        angle = float(rng.uniform(0.0, 360.0)) if turn and attempt < POSED_TRIES - 1 else 0.0
        covered = np.asarray(Image.new("L", (w, h), 255).rotate(angle, resample=Image.Resampling.NEAREST)) > 0
        turned = None if mask is None else mask.rotate(angle, resample=Image.Resampling.NEAREST)
        centre = _centre(turned)
        if turned is not None and centre is None and _centre(mask) is not None:
            continue  # the defect turned out of the frame
        box = _placement(covered, side, rng, centre)
        if box is not None:
            out = img.rotate(angle, resample=Image.Resampling.BILINEAR).crop(box)
            return out, None if turned is None else turned.crop(box), angle, box
    raise SystemExit("stress: no posed window found")  # unreachable: unturned, any window is covered


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
    recipe: dict[str, object] = {"source": str(source.resolve()), "kind": kind, "seed": seed, "version": 1}
    if kind in ("posed", "unseen-poses"):
        recipe["side"] = POSED_SIDE
    if (target / RECIPE).is_file() and json.loads((target / RECIPE).read_text()) == recipe:
        return target
    staging = out / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    rng = np.random.default_rng(seed)
    jobs: list[tuple[Path, Path, Path | None, Path | None]] = []
    for path in _images(source / "train" / "good"):
        jobs.append((path, staging / "train" / "good" / path.name, None, None))
    for folder in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        for path in _images(folder):
            mask_of = None if folder.name == "good" else _mask_of(source, folder.name, path)
            mask_out = None if mask_of is None else staging / "ground_truth" / folder.name / mask_of.name
            jobs.append((path, staging / "test" / folder.name / path.name, mask_of, mask_out))
    for img_path, img_out, mask_path, mask_out in jobs:
        img: Image.Image = Image.open(img_path)
        img.load()
        mask: Image.Image | None = None
        if mask_path is not None:
            mask = Image.open(mask_path).convert("L")
            mask.load()
        if kind == "rotated":
            angle = float(rng.uniform(0.0, 360.0))
            img = _rotate(img, angle, Image.Resampling.BILINEAR)
            mask = None if mask is None else _rotate(mask, angle, Image.Resampling.NEAREST)
        elif kind in ("posed", "unseen-poses"):
            training = img_out.relative_to(staging).parts[0] == "train"
            img, mask, _, _ = _posed(img, mask, rng, turn=kind == "posed" or not training)
        else:
            box = (_crop_box if kind == "crops" else _strip_box)(img.size, rng, _centre(mask))
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
