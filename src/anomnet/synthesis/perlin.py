"""Perlin-noise anomalies (DRAEM, as used by ToCoAD's anomaly generator G).

A good image is turned a little (and by a multiple of 90 degrees); a Perlin noise of random
lattice scale and orientation is thresholded into a mask (its size, count and position of
blobs vary with the threshold and the seed); a recoloured crop of a texture is blended into the
masked region: ``out = image (1 - m) + m ((1 - beta) texture + beta image)``, beta in
``[0, max_beta]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from anomnet.errors import DatasetError
from anomnet.synthesis.base import AnomalyGenerator, randint, random_rotation, synthesize_batch, uniform

__all__ = ["PerlinAnomaly", "load_textures", "perlin_mask", "perlin_noise", "random_rotation", "synthesize_batch"]


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(h: int, w: int, res: tuple[int, int], rng: torch.Generator, angle: float = 0.0) -> torch.Tensor:
    """``[h, w]`` gradient (Perlin) noise with ``res = (cells_y, cells_x)`` lattice cells over the
    image, the lattice turned by ``angle`` degrees; values roughly in [-1, 1]. The lattice wraps
    around (tileable), so any size and angle is covered."""
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    theta = torch.rand(ry, rx, generator=rng) * (2.0 * math.pi)
    gy, gx = torch.sin(theta), torch.cos(theta)
    py = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - h / 2.0
    px = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - w / 2.0
    a = math.radians(angle)
    y = (math.cos(a) * py - math.sin(a) * px + h / 2.0) * (ry / h)
    x = (math.sin(a) * py + math.cos(a) * px + w / 2.0) * (rx / w)
    y0f, x0f = torch.floor(y), torch.floor(x)
    fy, fx = y - y0f, x - x0f
    y0, x0 = y0f.long() % ry, x0f.long() % rx
    y1, x1 = (y0 + 1) % ry, (x0 + 1) % rx

    def corner(yi: torch.Tensor, xi: torch.Tensor, oy: float, ox: float) -> torch.Tensor:
        return gy[yi, xi] * (fy - oy) + gx[yi, xi] * (fx - ox)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(y0, x0, 0, 0), corner(y0, x1, 0, 1), tx)
    bottom = torch.lerp(corner(y1, x0, 1, 0), corner(y1, x1, 1, 1), tx)
    return math.sqrt(2.0) * torch.lerp(top, bottom, ty)


def perlin_mask(
    h: int,
    w: int,
    rng: torch.Generator,
    scales: tuple[int, int] = (0, 6),
    threshold: tuple[float, float] = (0.4, 0.6),
    min_area: float = 0.002,
    tries: int = 20,
) -> torch.Tensor:
    """A non-empty ``[h, w]`` float {0,1} mask: Perlin noise (lattice ``2**k`` cells per axis, k
    in ``[scales[0], scales[1])`` drawn per axis, random orientation) above a random threshold.
    Draws again (up to ``tries`` times) while the mask covers less than ``min_area`` of the image;
    then keeps the largest values of the last noise."""
    noise = torch.zeros(h, w)
    for _ in range(tries):
        res = (2 ** randint(rng, *scales), 2 ** randint(rng, *scales))
        angle = uniform(rng, -90.0, 90.0)
        t = uniform(rng, *threshold)
        noise = perlin_noise(h, w, res, rng, angle)
        mask = noise > t
        if mask.float().mean() >= min_area:
            return mask.float()
    k = max(1, int(math.ceil(min_area * h * w)))
    cut = noise.flatten().topk(k).values[-1]
    return (noise >= cut).float()


def load_textures(
    folder: str | Path | None = None, limit: int | None = 100, seed: int = 0, size: int = 256
) -> list[torch.Tensor]:
    """Texture images ``[3, h, w]`` (short side at most ``size``) from :mod:`anomnet.image_pool`:
    the named folder or ``$ANOMNET_TEXTURE_DIR`` (a seeded subset of ``limit`` files; missing or
    empty: ConfigError), plus scikit-image's bundled photos. An empty list only when there is
    nothing at all (the generator then uses the image itself, shifted and recoloured)."""
    from anomnet.image_pool import generic_images
    from anomnet.imageio import to_tensor
    from anomnet.transforms import resize

    try:
        arrays = generic_images(folder, include_builtin=True, limit=limit, seed=seed)
    except DatasetError:  # no folder and no bundled photos
        return []
    except ImportError:  # no scikit-image: folder images only
        try:
            arrays = generic_images(folder, include_builtin=False, limit=limit, seed=seed)
        except DatasetError:
            return []
    out = []
    for a in arrays:
        t = to_tensor(a)
        short = min(t.shape[-2:])
        if short > size:
            hw = (max(1, round(t.shape[-2] * size / short)), max(1, round(t.shape[-1] * size / short)))
            t = resize(t[None], hw)[0]
        out.append(t.contiguous())
    return out


def recolour(t: torch.Tensor, rng: torch.Generator, count: int = 3) -> torch.Tensor:
    """``count`` random colour changes of a ``[3,H,W]`` image in [0,1] (gamma, brightness, channel
    order, inversion, solarisation, contrast), as DRAEM's texture augmentation."""
    ops = torch.randperm(6, generator=rng)[:count].tolist()
    for op in ops:
        if op == 0:
            t = t.clamp(min=0.0) ** uniform(rng, 0.5, 2.0)
        elif op == 1:
            t = t * uniform(rng, 0.8, 1.2) + uniform(rng, -0.3, 0.3)
        elif op == 2:
            t = t[torch.randperm(3, generator=rng)]
        elif op == 3:
            t = 1.0 - t
        elif op == 4:
            thr = uniform(rng, 0.3, 0.9)
            t = torch.where(t > thr, 1.0 - t, t)
        else:
            mean = t.mean()
            t = (t - mean) * uniform(rng, 0.5, 1.5) + mean
    return t.clamp(0.0, 1.0)


class PerlinAnomaly(AnomalyGenerator):
    """Perlin-noise mask with a blended texture (see the module docstring).

    ``textures``: ``[3,h,w]`` tensors (:func:`load_textures`); empty or ``None``: the image itself,
    shifted and recoloured, is the texture.
    """

    def __init__(
        self,
        textures: Sequence[torch.Tensor] | None = None,
        rotate: bool = True,
        max_angle: float = 10.0,
        max_beta: float = 0.8,
        scales: tuple[int, int] = (0, 6),
        threshold: tuple[float, float] = (0.4, 0.6),
        min_area: float = 0.002,
    ) -> None:
        super().__init__(rotate, max_angle)
        self.textures = list(textures or [])
        self.max_beta = max_beta
        self.scales = scales
        self.threshold = threshold
        self.min_area = min_area

    def texture(self, image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A recoloured random crop of a texture at the image's size."""
        h, w = image.shape[-2:]
        if not self.textures:
            dy, dx = randint(rng, h // 4, 3 * h // 4 + 1), randint(rng, w // 4, 3 * w // 4 + 1)
            return recolour(torch.roll(image, (dy, dx), (1, 2)), rng)
        tex = self.textures[randint(rng, 0, len(self.textures))]
        th, tw = tex.shape[-2:]
        side = max(8, int(min(th, tw) * uniform(rng, 0.5, 1.0)))
        side_h, side_w = min(side, th), min(side, tw)
        top, left = randint(rng, 0, th - side_h + 1), randint(rng, 0, tw - side_w + 1)
        crop = tex[:, top : top + side_h, left : left + side_w]
        crop = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return recolour(crop, rng)

    def alter(self, image: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        mask = perlin_mask(h, w, rng, self.scales, self.threshold, self.min_area)
        tex = self.texture(image, rng)
        beta = uniform(rng, 0.0, self.max_beta)
        m = mask[None]
        out = image * (1.0 - m) + m * ((1.0 - beta) * tex + beta * image)
        return out, mask
