"""The generator interface shared by the anomaly synthesisers, and small seeded random helpers."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from anomnet.errors import ConfigError


def uniform(rng: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=rng))


def randint(rng: torch.Generator, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, (1,), generator=rng))


def random_rotation(image: torch.Tensor, rng: torch.Generator, max_angle: float = 10.0) -> torch.Tensor:
    """``[3,H,W]`` image turned by a random multiple of 90 degrees (0 / 180 only when not square)
    and then by a slight random angle in ``[-max_angle, max_angle]`` degrees (reflected borders)."""
    h, w = image.shape[-2:]
    k = randint(rng, 0, 4) if h == w else 2 * randint(rng, 0, 2)
    out = torch.rot90(image, k, (1, 2)) if k else image
    angle = uniform(rng, -max_angle, max_angle) if max_angle > 0 else 0.0
    if angle == 0.0:
        return out.contiguous()
    a = math.radians(angle)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]], dtype=image.dtype
    )
    grid = F.affine_grid(theta[None], [1, 3, h, w], align_corners=False)
    return F.grid_sample(out[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


class AnomalyGenerator(ABC):
    """``generator(image, rng) -> (image, mask)``: a synthetic defect on one good image.

    With ``rotate``, the good image is first turned (:func:`random_rotation`); :meth:`normal`
    applies only that turn, so that good and defective training images differ only by the defect.
    """

    def __init__(self, rotate: bool = False, max_angle: float = 10.0) -> None:
        self.rotate = rotate
        self.max_angle = max_angle

    def normal(self, image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """The geometric augmentation of a good image (no defect)."""
        return random_rotation(image, rng, self.max_angle) if self.rotate else image

    def __call__(self, image: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``[3,H,W]`` in [0,1] -> (altered image ``[3,H,W]``, mask ``[H,W]`` float in {0,1}, never empty)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ConfigError(f"expected one [3,H,W] image, got {tuple(image.shape)}")
        base = self.normal(image.float(), rng)
        out, mask = self.alter(base, rng)
        return out.clamp(0.0, 1.0), mask

    @abstractmethod
    def alter(self, image: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one defect to an (already rotated) image; pixels outside the mask stay unchanged."""


def synthesize_batch(
    generator: AnomalyGenerator, images: torch.Tensor, rng: torch.Generator, probability: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,3,H,W]`` good images -> (images, masks ``[B,H,W]``); each gets a defect with ``probability``
    (the others only the generator's geometric augmentation and an empty mask)."""
    outs, masks = [], []
    for img in images:
        if float(torch.rand((), generator=rng)) < probability:
            o, m = generator(img, rng)
        else:
            o, m = generator.normal(img, rng), img.new_zeros(img.shape[-2:])
        outs.append(o)
        masks.append(m)
    return torch.stack(outs), torch.stack(masks)
