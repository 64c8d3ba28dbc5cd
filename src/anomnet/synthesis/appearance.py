"""Appearance augmentation: one of colour jitter, sharpness or gamma, chosen at random (seeded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomnet.synthesis.base import randint, uniform

_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's SMOOTH kernel


def _gray(image: torch.Tensor) -> torch.Tensor:
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def colour_jitter(image: torch.Tensor, rng: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Brightness, contrast or saturation scaled by a factor in ``[1 - strength, 1 + strength]``."""
    f = uniform(rng, 1 - strength, 1 + strength)
    kind = randint(rng, 0, 3)
    if kind == 0:
        return image * f
    if kind == 1:
        return (image - _gray(image).mean()) * f + _gray(image).mean()
    return (image - _gray(image)) * f + _gray(image)


def sharpness(image: torch.Tensor, rng: torch.Generator, lo: float = 0.5, hi: float = 2.0) -> torch.Tensor:
    """Blend with a smoothed copy (factor < 1 blurs, > 1 sharpens), borders kept, like PIL's ImageEnhance."""
    f = uniform(rng, lo, hi)
    kernel = _SMOOTH.to(image.dtype).expand(3, 1, 3, 3)
    smooth = image.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(image[None], kernel, groups=3)[0]
    return smooth + f * (image - smooth)


def gamma(image: torch.Tensor, rng: torch.Generator, lo: float = 0.8, hi: float = 1.25) -> torch.Tensor:
    return image.clamp_min(0.0).pow(uniform(rng, lo, hi))


def appearance_augment(image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """``[3,H,W]`` in [0,1] -> one randomly chosen appearance change, clamped to [0,1]."""
    op = (colour_jitter, sharpness, gamma)[randint(rng, 0, 3)]
    return op(image, rng).clamp(0.0, 1.0)
