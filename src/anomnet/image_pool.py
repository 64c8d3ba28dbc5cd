"""A pool of generic (non-product) images: textures for anomaly synthesis, distillation, penalties.

The source is explicit and never depends on the working directory or on where anomnet is
installed:

1. a folder the caller names (ToCoAD's ``textures``, EfficientAD's ``pool_dir`` setting), else
2. the folder named by ``$ANOMNET_TEXTURE_DIR``, else
3. no folder: only scikit-image's bundled sample photos (brick, grass, gravel, coffee, ...), which
   ship inside its wheel. A notice saying so is printed on stderr once per process.

A folder that is configured (1 or 2) but missing or without images is a :class:`ConfigError`
naming it: no silent fallback. Folder images come first, then the bundled photos. Detectors record
:func:`describe_source` in their fit record. Images are float32 ``H x W x 3`` arrays in ``[0, 1]``
read through :mod:`anomnet.imageio`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from anomnet.errors import ConfigError, DatasetError
from anomnet.imageio import list_images, read_image

# Bundled with scikit-image (no download); textures first.
BUILTIN_NAMES = (
    "brick",
    "grass",
    "gravel",
    "coffee",
    "astronaut",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "horse",
    "clock",
    "colorwheel",
    "immunohistochemistry",
    "cell",
    "hubble_deep_field",
)


TEXTURE_ENV = "ANOMNET_TEXTURE_DIR"
_notice_shown = False


def default_texture_dir() -> Path | None:
    """The folder named by ``$ANOMNET_TEXTURE_DIR``, or None (then only the bundled photos are used)."""
    env = os.environ.get(TEXTURE_ENV)
    return Path(env).expanduser() if env else None


def _configured_folder(folder: str | Path | None) -> tuple[Path | None, str]:
    """The folder to read and what configured it (for error messages)."""
    if folder is not None and str(folder) != "":
        return Path(folder).expanduser(), "texture folder"
    env = default_texture_dir()
    return (env, f"texture folder from ${TEXTURE_ENV}") if env is not None else (None, "")


def texture_paths(folder: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Image files of ``folder`` (recursive), or of ``$ANOMNET_TEXTURE_DIR``; [] when neither is set.

    A configured folder must exist and hold images (ConfigError naming it). With ``limit``, a
    seeded random subset.
    """
    path, what = _configured_folder(folder)
    if path is None:
        return []
    if not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} does not exist or is not a folder")
    try:
        paths = list_images(path, recursive=True)
    except DatasetError as exc:
        raise ConfigError(f"{what} {str(path)!r} holds no usable images ({exc})") from None
    if not paths:
        raise ConfigError(f"{what} {str(path)!r} holds no images")
    if limit is not None and len(paths) > limit:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), size=limit, replace=False))]
    return paths


def describe_source(folder: str | Path | None, count: int, limit: int | None = None, seed: int = 0) -> str:
    """What a fit records in ``fit_record.data_sources``: the folder (absolute) and the image count."""
    path, _ = _configured_folder(folder)
    files = len(texture_paths(folder, limit, seed)) if path is not None else 0
    where = f"{path.resolve()} ({files} files) + " if path is not None else ""
    return f"{where}scikit-image sample photos; {count} images in all"


def _notice_builtin_only() -> None:
    global _notice_shown
    if not _notice_shown:
        _notice_shown = True
        print(
            f"anomnet: no texture folder set (setting, or ${TEXTURE_ENV}): using scikit-image's bundled sample photos",
            file=sys.stderr,
        )


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
    paths = texture_paths(folder, limit, seed)
    if not paths:
        _notice_builtin_only()
    images = [read_image(p) for p in paths]
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
