"""The generic image pool: texture folder + built-in photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet.errors import ConfigError
from anomnet.image_pool import builtin_images, describe_source, generic_images, texture_paths


def _write(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 10, 3), i * 20, np.uint8)).save(folder / f"t{i}.png")


def test_builtin_photos_are_rgb_floats() -> None:
    images = builtin_images(("brick", "coffee"))
    assert len(images) == 2
    for img in images:
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32
        assert img.min() >= 0.0 and img.max() <= 1.0 and img.max() > 0.5


def test_user_folder_recursive_and_seeded_limit(tmp_path: Path) -> None:
    _write(tmp_path / "a", 3)
    _write(tmp_path / "b", 3)
    assert len(texture_paths(tmp_path)) == 6
    first = texture_paths(tmp_path, limit=4, seed=1)
    assert len(first) == 4 and first == texture_paths(tmp_path, limit=4, seed=1)
    pool = generic_images(tmp_path, include_builtin=False)
    assert len(pool) == 6 and pool[0].shape == (8, 10, 3)


def test_named_folder_must_exist_and_hold_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="texture folder.*missing"):
        texture_paths(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="texture folder.*empty"):
        texture_paths(tmp_path / "empty")
    monkeypatch.setenv("ANOMNET_TEXTURE_DIR", str(tmp_path / "gone"))  # a configured default: no silent fallback
    with pytest.raises(ConfigError, match="ANOMNET_TEXTURE_DIR.*gone"):
        generic_images()


def test_without_any_folder_the_builtin_photos_remain_with_a_notice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ANOMNET_TEXTURE_DIR", raising=False)
    monkeypatch.setattr("anomnet.image_pool._notice_shown", False)
    assert texture_paths() == []
    assert len(generic_images()) >= 10
    assert "bundled sample photos" in capsys.readouterr().err
    generic_images()
    assert capsys.readouterr().err == ""  # once per process


def test_the_default_source_does_not_depend_on_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANOMNET_TEXTURE_DIR", raising=False)
    shared = tmp_path / "shared" / "datasets" / "dtd_subset"  # where the old lookup searched, seen from the cwd
    _write(shared, 3)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert texture_paths() == [] and describe_source(None, 16).startswith("scikit-image")
    monkeypatch.setenv("ANOMNET_TEXTURE_DIR", str(shared))
    here = describe_source(None, 19)
    monkeypatch.chdir(tmp_path)
    assert describe_source(None, 19) == here and str(shared.resolve()) in here and "(3 files)" in here
