"""The reference code's training augmentations (setting ``augment``), on images ``[B, 3, H, W]`` in [0, 1].

Applied to each query and each reference independently, after the defect is pasted, each with
probability ``p = 0.3`` (the reference code's ``RandomApply`` of ``RandomSPNoise(0.97)`` and
``RandomLightness(0.1)``):

* :func:`salt_and_pepper`: a share drawn uniformly from [0, 0.03] of the pixels turns white or
  black (half each), all channels alike;
* :func:`lightness`: the HLS lightness scaled by a factor drawn from [0.9, 1.1] (clipped to
  [0, 1]), hue and saturation kept.
"""

from __future__ import annotations

import torch


def _chosen(b: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(b, generator=generator) < p


def salt_and_pepper(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.3, max_share: float = 0.03
) -> torch.Tensor:
    """A copy of ``images`` where, in the images chosen with probability ``p``, a share ``U(0, max_share)`` of
    the pixels is set to 1 and as many to 0."""
    b, _, h, w = images.shape
    share = torch.rand(b, 1, 1, 1, generator=generator) * max_share * _chosen(b, p, generator).view(b, 1, 1, 1)
    u = torch.rand(b, 1, h, w, generator=generator)
    out = images.clone()
    out = torch.where(u < share / 2, torch.ones_like(out), out)
    return torch.where((u >= share / 2) & (u < share), torch.zeros_like(out), out)


def scale_lightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``images`` with the HLS lightness ``L = (max + min) / 2`` times ``factor`` ``[B]`` (clipped to [0, 1]).

    With hue and saturation fixed a channel is ``L + C(L) d`` with ``C(L) = 1 - |2L - 1|`` and ``d`` set by
    hue and saturation, so ``d`` is read off the image and reused at the new lightness (grey pixels keep
    ``d = 0``)."""
    hi, lo = images.amax(1, keepdim=True), images.amin(1, keepdim=True)
    light = (hi + lo) / 2
    span = 1 - (2 * light - 1).abs()
    d = torch.where(span > 1e-6, (images - light) / span.clamp_min(1e-6), torch.zeros_like(images))
    new = (light * factor.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    return (new + (1 - (2 * new - 1).abs()) * d).clamp(0.0, 1.0)


def lightness(images: torch.Tensor, generator: torch.Generator, p: float = 0.3, ratio: float = 0.1) -> torch.Tensor:
    """``images`` whose lightness, in the images chosen with probability ``p``, is scaled by ``U(1 - ratio,
    1 + ratio)`` (the others unchanged)."""
    b = images.shape[0]
    factor = 1 + (torch.rand(b, generator=generator) * 2 - 1) * ratio
    factor = torch.where(_chosen(b, p, generator), factor, torch.ones_like(factor))
    return scale_lightness(images, factor)


def reference_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Salt-and-pepper noise, then the lightness change, each applied with probability 0.3 per image."""
    return lightness(salt_and_pepper(images, generator), generator)
