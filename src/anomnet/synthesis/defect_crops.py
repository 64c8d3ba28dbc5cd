"""Real defect crops from a user's folder, and pasting one onto a good image.

A folder of crops holds image files (PNG, JPEG, TIFF, BMP; subfolders are searched). A crop's
mask, the defect's own pixels inside the crop, is the file ``<stem>_mask.<ext>`` beside it
when there is one (binary, the crop's size); otherwise the pixels whose gray level differs from
the crop's border (its median) by more than ``threshold``, or the whole crop when none does.
Files named ``*_mask.*`` are masks, never crops. A missing folder, or one without crops, is a
:class:`~anomnet.errors.ConfigError` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anomnet.errors import ConfigError, DatasetError
from anomnet.synthesis.base import randint, uniform
from anomnet.synthesis.noise_patches import foreground_mask

MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class DefectCrop:
    """One real defect: ``image [3, h, w]`` in [0, 1] and ``mask [h, w]`` float {0, 1} (never empty)."""

    image: torch.Tensor
    mask: torch.Tensor
    source: str


def defect_crop_paths(folder: str | Path) -> list[tuple[Path, Path | None]]:
    """``(crop, mask or None)`` for every crop in ``folder`` (recursive, sorted)."""
    from anomnet.imageio import list_images

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"defect crop folder {str(path)!r} does not exist or is not a folder")
    try:
        files = list_images(path, recursive=True)
    except DatasetError as exc:
        raise ConfigError(f"defect crop folder {str(path)!r} holds no images ({exc})") from None
    masks = {(f.parent, f.stem[: -len(MASK_SUFFIX)]): f for f in files if f.stem.endswith(MASK_SUFFIX)}
    crops = [(f, masks.get((f.parent, f.stem))) for f in files if not f.stem.endswith(MASK_SUFFIX)]
    if not crops:
        raise ConfigError(f"defect crop folder {str(path)!r} holds only masks (*{MASK_SUFFIX}.*), no defect crops")
    return crops


def load_defect_crops(
    folder: str | Path, limit: int | None = None, seed: int = 0, max_side: int = 512, threshold: float = 0.1
) -> list[DefectCrop]:
    """The crops of ``folder`` (a seeded subset of ``limit`` when given), longer side at most ``max_side``."""
    from anomnet.imageio import read_image, read_mask, to_tensor

    pairs = defect_crop_paths(folder)
    if limit is not None and len(pairs) > limit:
        pick = np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False)
        pairs = [pairs[i] for i in sorted(pick)]
    crops = []
    for image_path, mask_path in pairs:
        image = to_tensor(read_image(image_path))
        h, w = image.shape[-2:]
        if mask_path is not None:
            mask = torch.from_numpy(read_mask(mask_path, (h, w))).float()
            if not bool(mask.any()):
                raise ConfigError(f"defect crop mask {mask_path} is empty: it marks no defect pixel")
        else:
            mask = foreground_mask(image, threshold).float()
            if not bool(mask.any()):
                mask = torch.ones(h, w)
        scale = min(1.0, max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            image, mask = _resize_pair(image, mask, size)
        crops.append(DefectCrop(image.contiguous(), mask.contiguous(), str(image_path)))
    return crops


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    img = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    m = F.interpolate(mask[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5
    if not bool(m.any()):  # a tiny defect shrunk away: keep its most covered pixel
        soft = F.interpolate(mask[None, None], size=size, mode="area")[0, 0]
        m = soft == soft.max()
    return img.clamp(0.0, 1.0), m.float()


def paste_crop(
    image: torch.Tensor,
    crop: DefectCrop,
    centre: tuple[float, float],
    rng: torch.Generator,
    size: tuple[float, float] = (0.05, 0.25),
    blend: tuple[float, float] = (0.7, 1.0),
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image [3, H, W]`` with ``crop``'s defect pasted about ``centre`` -> (image, mask ``[H, W]``).

    The crop is turned by a random multiple of 90 degrees, maybe mirrored, scaled so that its
    longer side is ``size`` x the image's shorter side, its brightness jittered by ``jitter``,
    and its masked pixels blended in with a factor drawn from ``blend``; the mask is those pixels.
    """
    _, h, w = image.shape
    src, m = crop.image, crop.mask
    k = randint(rng, 0, 4)
    src, m = torch.rot90(src, k, (1, 2)), torch.rot90(m, k, (0, 1))
    if randint(rng, 0, 2):
        src, m = src.flip(-1), m.flip(-1)
    ch, cw = src.shape[-2:]
    longer = max(1.0, uniform(rng, *size) * min(h, w))
    scale = longer / max(ch, cw)
    th, tw = max(1, min(h, round(ch * scale))), max(1, min(w, round(cw * scale)))
    src, m = _resize_pair(src, m, (th, tw))
    src = (src * uniform(rng, 1.0 - jitter, 1.0 + jitter)).clamp(0.0, 1.0)
    top = min(max(int(math.floor(centre[0] - th / 2)), 0), h - th)
    left = min(max(int(math.floor(centre[1] - tw / 2)), 0), w - tw)
    factor = uniform(rng, *blend)
    out = image.clone()
    region = out[:, top : top + th, left : left + tw]
    a = factor * m[None]
    out[:, top : top + th, left : left + tw] = region * (1.0 - a) + src * a
    mask = image.new_zeros(h, w)
    mask[top : top + th, left : left + tw] = m
    return out, mask
