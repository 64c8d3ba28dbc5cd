"""The stress variants of benchmarks/stress.py: seeded, in the MVTec layout, masks cut with their images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stress  # noqa: E402


def _mvtec(root: Path, n_train: int = 6, n_bad: int = 4, size: int = 64) -> Path:
    """A tiny MVTec-layout class: bright images (no pixel black), defects as small squares near the corners."""
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def image() -> np.ndarray:
        return rng.integers(60, 255, (size, size, 3), dtype=np.uint8)

    for i in range(n_train):
        Image.fromarray(image()).save(root / "train" / "good" / f"{i:03d}.png")
    Image.fromarray(image()).save(root / "test" / "good" / "000.png")
    for i in range(n_bad):
        Image.fromarray(image()).save(root / "test" / "dent" / f"{i:03d}.png")
        mask = np.zeros((size, size), dtype=np.uint8)
        r, c = (4, 4) if i % 2 else (size - 10, 6)  # near a corner: turned out of a centred square at some angles
        mask[r : r + 5, c : c + 5] = 255
        Image.fromarray(mask).save(root / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    return root


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_posed_is_seeded_turned_placed_and_keeps_every_defect(tmp_path: Path) -> None:
    source = _mvtec(tmp_path / "part")
    out = stress.make_variant(source, "posed", tmp_path / "a")
    assert out.name == "part-posed"
    assert json.loads((out / stress.RECIPE).read_text())["side"] == stress.POSED_SIDE
    got = _pixels(out)
    side = int(stress.POSED_SIDE * 64)
    assert len(got) == 6 + 1 + 4 + 4 and all(a.shape[:2] == (side, side) for a in got.values())
    # the turned image covers every window: no empty (black) corner
    assert all(a.min() > 0 for k, a in got.items() if not k.startswith("ground_truth"))
    # every defect is still in its image, and each mask has its image's size
    masks = {k: a for k, a in got.items() if k.startswith("ground_truth")}
    assert len(masks) == 4 and all((a > 127).any() for a in masks.values())
    # a pure function of source, kind and seed; another seed, other poses
    assert all(
        np.array_equal(a, _pixels(stress.make_variant(source, "posed", tmp_path / "b"))[k]) for k, a in got.items()
    )
    other = _pixels(stress.make_variant(source, "posed", tmp_path / "c", seed=1))
    assert not np.array_equal(other["train/good/000.png"], got["train/good/000.png"])


def test_posed_varies_the_angle_and_the_place() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(np.full((100, 100, 3), 200, dtype=np.uint8))
    poses = [stress._posed(img, None, rng)[2:] for _ in range(20)]
    angles = [a for a, _ in poses]
    lefts = {box[0] for _, box in poses}
    assert max(angles) - min(angles) > 180 and len(lefts) > 5
    assert all(box[2] - box[0] == box[3] - box[1] == 60 for _, box in poses)  # one scale: POSED_SIDE of 100 px


def test_a_defect_turned_out_of_the_frame_draws_another_pose() -> None:
    img = Image.fromarray(np.full((100, 100, 3), 200, dtype=np.uint8))
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[0:3, 0:3] = 255  # the very corner: out of the frame at most angles, never cut off by the variant
    for seed in range(5):
        _, turned, angle, box = stress._posed(img, Image.fromarray(mask), np.random.default_rng(seed))
        assert turned is not None and (np.asarray(turned) > 127).any(), (seed, angle, box)


def test_existing_kinds_are_unchanged_and_reused(tmp_path: Path) -> None:
    source = _mvtec(tmp_path / "part")
    crops = stress.make_variant(source, "crops", tmp_path / "out")
    first = _pixels(crops)
    (crops / "marker").write_text("kept")
    assert stress.make_variant(source, "crops", tmp_path / "out") == crops and (crops / "marker").is_file()
    rotated = _pixels(stress.make_variant(source, "rotated", tmp_path / "out"))
    assert rotated["train/good/000.png"].shape[0] == rotated["train/good/000.png"].shape[1] <= 64
    assert len(first) == len(rotated) == 15
    with pytest.raises(SystemExit, match="unknown kind"):
        stress.make_variant(source, "twisted", tmp_path / "out")


def test_unseen_poses_turn_only_the_test_images(tmp_path: Path) -> None:
    source = _mvtec(tmp_path / "part")
    out = stress.make_variant(source, "unseen-poses", tmp_path / "out")
    assert out.name == "part-unseen-poses"
    side = int(stress.POSED_SIDE * 64)
    train = sorted((source / "train" / "good").iterdir())
    for path in train:  # a training image is a window of its source, not turned
        src, got = np.asarray(Image.open(path)), np.asarray(Image.open(out / "train" / "good" / path.name))
        assert got.shape[:2] == (side, side)
        assert any(
            np.array_equal(src[t : t + side, x : x + side], got)
            for t in range(64 - side + 1)
            for x in range(64 - side + 1)
        )
    test = np.asarray(Image.open(source / "test" / "good" / "000.png"))
    turned = np.asarray(Image.open(out / "test" / "good" / "000.png"))
    windows = (test[t : t + side, x : x + side] for t in range(64 - side + 1) for x in range(64 - side + 1))
    assert not any(np.array_equal(w, turned) for w in windows)  # a test image is turned
    assert all((np.asarray(Image.open(p)) > 127).any() for p in (out / "ground_truth" / "dent").iterdir())
