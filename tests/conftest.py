"""Shared fixtures: a small synthetic dataset in the generic folder layout, and the shared MVTec data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = SHARED / "mvtec_ad" / "bottle"
PIPED = SHARED / "piped"


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A regular striped texture with mild noise: every good image looks alike."""
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.25 * np.sin(x / 3.0 + rng.uniform(0, 0.3)) * np.cos(y / 5.0)
    img = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 0.02, (size, size, 3))
    return np.clip(img, 0, 1)


def make_folder_dataset(
    root: Path, n_train: int = 12, n_good: int = 4, n_bad: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """train/, test/good, test/blob and masks/: defects are bright squares at random places."""
    rng = np.random.default_rng(seed)
    for sub in ("train", "test/good", "test/blob", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    save = lambda a, p: Image.fromarray((a * 255).astype(np.uint8)).save(p)  # noqa: E731
    for i in range(n_train):
        save(_texture(rng, size), root / "train" / f"t{i:03d}.png")
    for i in range(n_good):
        save(_texture(rng, size), root / "test" / "good" / f"g{i:03d}.png")
    for i in range(n_bad):
        img = _texture(rng, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        r, c = rng.integers(8, size - 20, 2)
        img[r : r + 12, c : c + 12] = [1.0, 0.1, 0.1]
        mask[r : r + 12, c : c + 12] = 255
        save(img, root / "test" / "blob" / f"b{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{i:03d}.png")
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "data")


@pytest.fixture
def bottle() -> Path:
    if not BOTTLE.is_dir():
        pytest.skip("shared MVTec bottle data not present")
    return BOTTLE


@pytest.fixture
def piped() -> Path:
    if not PIPED.is_dir():
        pytest.skip("shared PIPED data not present")
    return PIPED


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """One local Ray with 2 CPUs for every Ray test of the session (it takes seconds to start)."""
    ray = pytest.importorskip("ray", reason="the Ray tests need the anomnet[ray] extra (make setup-all)")
    pytest.importorskip("ray.data", reason="the Ray tests need ray[data] (make setup-all)")
    from anomnet.engine.ray_predict import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()
