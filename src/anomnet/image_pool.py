"""A pool of generic (non-product) images: textures for anomaly synthesis, distillation, penalties.

Sources, in this order:

1. a folder the caller names, or ``$ANOMNET_TEXTURE_DIR``, or the DTD texture subset beside the
   project (``../shared/datasets/dtd_subset`` seen from the working directory or the source
   tree) when present;
2. scikit-image's bundled sample photos (brick, grass, gravel, coffee, ...), which ship inside
   its wheel, so the pool is never empty on a fresh machine.

Images are float32 ``H x W x 3`` arrays in ``[0, 1]`` read through :mod:`anomnet.io`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from anomnet.errors import DatasetError
from anomnet.io import list_images, read_image

# Bundled with scikit-image (no download); textures first.
BUILTIN_NAMES = (
    "brick", "grass", "gravel", "coffee", "astronaut", "chelsea", "rocket", "camera",
    "coins", "moon", "horse", "clock", "colorwheel", "immunohistochemistry", "cell", "hubble_deep_field",
)


def default_texture_dir() -> Path | None:
    """``$ANOMNET_TEXTURE_DIR`` or the DTD subset beside the project, if it exists."""
    env = os.environ.get("ANOMNET_TEXTURE_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        candidate = root.parent / "shared" / "datasets" / "dtd_subset"
        if candidate.is_dir():
            return candidate
    return None


def texture_paths(folder: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Image files of ``folder`` (recursive), or of the default texture folder; [] when there is none.

    A folder named explicitly must exist and hold images. With ``limit``, a seeded random subset.
    """
    explicit = folder is not None
    path = Path(folder) if explicit else default_texture_dir()
    if path is None or (not explicit and not path.is_dir()):
        return []
    try:
        paths = list_images(path, recursive=True)
    except DatasetError as exc:
        if explicit:
            raise DatasetError(f"texture folder: {exc}") from None
        return []
    if limit is not None and len(paths) > limit:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), size=limit, replace=False))]
    return paths


def builtin_images(names: tuple[str, ...] = BUILTIN_NAMES) -> list[np.ndarray]:
    """scikit-image's bundled sample photos as float32 RGB in [0, 1] (gray ones replicated)."""
    import skimage.data

    images = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # a photo that this scikit-image build would have to download
            continue
        images.append(_to_rgb_float(img))
    return images


def generic_images(
    folder: str | Path | None = None,
    include_builtin: bool = True,
    limit: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """The pool: images of the texture folder (see :func:`texture_paths`) plus the built-in photos."""
    images = [read_image(p) for p in texture_paths(folder, limit, seed)]
    if include_builtin:
        images += builtin_images()
    if not images:
        raise DatasetError("no generic images: no texture folder and no built-in photos")
    return images


def _to_rgb_float(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    img = img.astype(np.float32)
    hi = float(img.max()) if img.size else 1.0
    return img / hi if hi > 1.0 else img
