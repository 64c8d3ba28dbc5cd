"""A small MVTec AD 2-shaped object folder built at test time from MVTec AD bottle images (never committed).

    <root>/bottle/
      train/good/000.png ...                 bottle training images, full resolution
      validation/good/000.png ...            other bottle training images
      test_public/good/000_regular.png ...   bottle good test images
      test_public/bad/000_regular.png ...    bottle defects (one per type, in turn)
      test_public/ground_truth/bad/000_regular_mask.png
      test_private/000_regular.png ...       good and defective images, no labels
      test_private_mixed/000_mixed.png ...   the same darkened (another lighting), no labels

``wide=True`` puts two bottle images side by side (900 x 1800 px, the defect's mask in its half):
non-square multi-image frames as MVTec AD 2 has, for the tiled protocol.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("broken_large", "broken_small", "contamination")


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _read_mask(path: Path | None, like: np.ndarray) -> np.ndarray:
    if path is None:
        return np.zeros(like.shape[:2], np.uint8)
    return np.asarray(Image.open(path).convert("L"))


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _frame(images: list[np.ndarray], wide: bool, partner: np.ndarray) -> np.ndarray:
    """One image, or with ``wide`` the image beside ``partner`` (a good image)."""
    return np.concatenate([images[0], partner], axis=1) if wide else images[0]


def build_mvtec_ad2(
    bottle: Path,
    root: Path,
    *,
    train: int = 8,
    validation: int = 4,
    public_good: int = 2,
    public_bad: int = 3,
    private: int = 4,
    wide: bool = False,
) -> Path:
    """Write the object folder ``root/bottle`` (see the module docstring) and return it."""
    obj = root / "bottle"
    good_train = sorted((bottle / "train" / "good").glob("*.png"))
    good_test = sorted((bottle / "test" / "good").glob("*.png"))
    bad: list[tuple[Path, str]] = []  # the defect types in turn
    for i in range(public_bad + private):
        defect = DEFECTS[i % len(DEFECTS)]
        bad.append((sorted((bottle / "test" / defect).glob("*.png"))[i // len(DEFECTS)], defect))
    partner = _read(good_train[-1])

    def put(
        src: Path, dst: Path, mask_src: Path | None = None, mask_dst: Path | None = None, gain: float = 1.0
    ) -> None:
        if not wide and gain == 1.0:  # the file as it is (fast)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            if mask_dst is not None and mask_src is not None:
                mask_dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(mask_src, mask_dst)
            return
        image = _read(src)
        frame = _frame([image], wide, partner)
        if gain != 1.0:
            frame = np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        _save(frame, dst)
        if mask_dst is not None:
            mask = _read_mask(mask_src, image)
            _save(_frame([mask], wide, np.zeros_like(mask)), mask_dst)

    for i, p in enumerate(good_train[:train]):
        put(p, obj / "train" / "good" / f"{i:03d}.png")
    for i, p in enumerate(good_train[train : train + validation]):
        put(p, obj / "validation" / "good" / f"{i:03d}.png")
    for i, p in enumerate(good_test[:public_good]):
        put(p, obj / "test_public" / "good" / f"{i:03d}_regular.png")
    for i, (p, defect) in enumerate(bad[:public_bad]):
        mask = bottle / "ground_truth" / defect / f"{p.stem}_mask.png"
        name = f"{i:03d}_regular"
        put(
            p,
            obj / "test_public" / "bad" / f"{name}.png",
            mask,
            obj / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png",
        )
    spare_good = good_test[public_good : public_good + private]
    unlabelled = [p for pair in zip([p for p, _ in bad[public_bad:]], spare_good) for p in pair]  # bad, good, ...
    for i, p in enumerate(unlabelled[:private]):
        put(p, obj / "test_private" / f"{i:03d}_regular.png")
        put(p, obj / "test_private_mixed" / f"{i:03d}_mixed.png", gain=0.7)
    return obj
