"""The generic image pool: texture folder + built-in photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet.errors import DatasetError
from anomnet.image_pool import builtin_images, generic_images, texture_paths


def _write(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 10, 3), i * 20, np.uint8)).save(folder / f"t{i}.png")


def test_builtin_photos_are_rgb_floats() -> None:
    images = builtin_images(("brick", "coffee"))
    assert len(images) == 2
    for img in images:
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5


def test_user_folder_recursive_and_seeded_limit(tmp_path: Path) -> None:
    _write(tmp_path / "a", 3)
    _write(tmp_path / "b", 3)
    assert len(texture_paths(tmp_path)) == 6
    first = texture_paths(tmp_path, limit=4, seed=1)
    assert len(first) == 4 and first == texture_paths(tmp_path, limit=4, seed=1)
    pool = generic_images(tmp_path, include_builtin=False)
    assert len(pool) == 6 and pool[0].shape == (8, 10, 3)


def test_named_folder_must_exist_and_hold_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="texture folder"):
        texture_paths(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="texture folder"):
        texture_paths(tmp_path / "empty")


def test_without_any_folder_the_builtin_photos_remain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("anomnet.image_pool.default_texture_dir", lambda: None)
    assert texture_paths() == []
    assert len(generic_images()) >= 10
