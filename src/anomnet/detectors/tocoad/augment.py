"""The two-view augmentation of ToCoAD's contrastive stage: random resized crop, colour jitter, grayscale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anomnet.synthesis.base import uniform

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def random_resized_crop(
    image: torch.Tensor,
    rng: torch.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (0.75, 4 / 3),
) -> torch.Tensor:
    """A crop of ``scale`` of the area and aspect ``ratio`` (log-uniform), resized back to the image's size."""
    h, w = image.shape[-2:]
    area = uniform(rng, *scale) * h * w
    r = math.exp(uniform(rng, math.log(ratio[0]), math.log(ratio[1])))
    ch = min(h, max(8, int(round(math.sqrt(area / r)))))
    cw = min(w, max(8, int(round(math.sqrt(area * r)))))
    top = int(uniform(rng, 0, h - ch + 1))
    left = int(uniform(rng, 0, w - cw + 1))
    crop = image[:, top : top + ch, left : left + cw]
    return F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def colour_jitter(image: torch.Tensor, rng: torch.Generator, strength: float = 0.4, hue: float = 0.1) -> torch.Tensor:
    """Brightness, contrast and saturation factors in ``[1 - strength, 1 + strength]`` and a hue
    rotation of up to ``hue`` turns (in YIQ space), in random order."""
    order = torch.randperm(4, generator=rng).tolist()
    x = image
    for op in order:
        if op == 0:
            x = x * uniform(rng, 1 - strength, 1 + strength)
        elif op == 1:
            m = (x * _LUMA).sum(0).mean()
            x = (x - m) * uniform(rng, 1 - strength, 1 + strength) + m
        elif op == 2:
            g = (x * _LUMA).sum(0, keepdim=True)
            x = (x - g) * uniform(rng, 1 - strength, 1 + strength) + g
        else:
            x = _hue_rotate(x, uniform(rng, -hue, hue) * 2 * math.pi)
        x = x.clamp(0.0, 1.0)
    return x


def _hue_rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", m, x)


def two_view_augment(
    image: torch.Tensor, rng: torch.Generator, crop_scale: float = 0.6, jitter_p: float = 0.8, gray_p: float = 0.2
) -> torch.Tensor:
    """One augmented view of a ``[3,H,W]`` image in [0,1]."""
    x = random_resized_crop(image, rng, (crop_scale, 1.0))
    if float(torch.rand((), generator=rng)) < jitter_p:
        x = colour_jitter(x, rng)
    if float(torch.rand((), generator=rng)) < gray_p:
        x = (x * _LUMA).sum(0, keepdim=True).expand(3, -1, -1)
    return x.contiguous()
