"""Regression tests: the tool never loses, mixes up or corrupts a user's files (each case was a real failure)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import io
from anomnet.errors import DatasetError


def _png(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_symlink_loops_are_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _png(root / "a.png")
    _png(root / "sub" / "b.png")
    os.symlink(".", root / "x")
    os.symlink(".", root / "sub" / "y")
    result: list[Path] = []
    worker = threading.Thread(target=lambda: result.extend(io.list_images(root, recursive=True)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "listing a folder with a symlink loop did not finish"
    assert sorted(p.name for p in result) == ["a.png", "b.png"]


def test_symlinked_folder_outside_is_still_read(tmp_path: Path) -> None:
    other = tmp_path / "other"
    _png(other / "c.png")
    root = tmp_path / "imgs"
    _png(root / "a.png")
    os.symlink(other, root / "linked")
    assert sorted(p.name for p in io.list_images(root, recursive=True)) == ["a.png", "c.png"]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    data = np.zeros((4, 6, 3), np.uint8)
    data[0, :] = 255  # top row white as stored
    im = Image.fromarray(data)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=100)
    image = io.read_image(path)
    assert image.shape[:2] == (6, 4)
    assert io.image_size(path) == (6, 4)
    # the stored top row is the rightmost column once rotated clockwise
    assert image[:, -1].mean() > 0.8 and image[:, 0].mean() < 0.2


def test_missing_folder_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        io.list_images(tmp_path / "nope")
