"""Real-looking defects pasted onto good images: spots, cracks, scratches, or the user's real defect crops.

The VAND 2025 hybrid (Wang et al.) trains CPR's retrieval feature on good images with
"cut-paste of real-looking defects (cracks, spots, scratches)" instead of CPR's Perlin-noise
textures. :class:`RealisticDefects` is that generator, used by the CPR detector and by anyone
who needs defects that look like defects (e.g. validation images with known masks):

* without crops: 1 to 3 defects per image, each a spot, a crack or a scratch
  (:mod:`anomnet.synthesis.defect_shapes`) in a colour taken from the image (darker, brighter
  or tinted), with a little grain;
* with ``crops`` (:func:`~anomnet.synthesis.defect_crops.load_defect_crops` of a folder of real
  defect crops): each defect is one of them, turned, scaled and blended in
  (:func:`~anomnet.synthesis.defect_crops.paste_crop`); ``crop_share`` < 1 mixes in drawn shapes.

The mask is exactly the pixels that changed. ``allowed`` (or ``avoid_background``) keeps every
defect's centre on the given pixels (e.g. a foreground estimate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from anomnet.errors import ConfigError
from anomnet.synthesis.base import AnomalyGenerator, randint, uniform
from anomnet.synthesis.defect_crops import DefectCrop, paste_crop
from anomnet.synthesis.defect_shapes import crack_alpha, scratch_alpha, spot_alpha
from anomnet.synthesis.noise_patches import foreground_mask

DefectKind = Literal["spot", "crack", "scratch"]
DEFECT_KINDS: tuple[DefectKind, ...] = ("spot", "crack", "scratch")

Shape = Callable[[int, int, tuple[float, float], torch.Generator], torch.Tensor]


def defect_colour(image: torch.Tensor, alpha: torch.Tensor, tone: str, rng: torch.Generator) -> torch.Tensor:
    """``[3, H, W]`` colour layer of a defect: the image's mean colour under ``alpha`` made darker,
    brighter or tinted (``tone``), with a little per-pixel grain."""
    weight = alpha / alpha.sum().clamp_min(1e-12)
    base = (image * weight).sum((1, 2))  # [3]
    if tone == "dark":
        colour = base * uniform(rng, 0.05, 0.45) + torch.tensor([uniform(rng, -0.03, 0.03) for _ in range(3)])
    elif tone == "bright":
        colour = base + (1.0 - base) * uniform(rng, 0.4, 0.9)
    else:  # tinted: a random hue, about as bright as the surface or darker
        hue = torch.rand(3, generator=rng)
        colour = hue / hue.max().clamp_min(1e-6) * float(base.mean()) * uniform(rng, 0.3, 1.0)
    grain = 1.0 + 0.06 * torch.randn(1, *image.shape[-2:], generator=rng)
    return (colour[:, None, None] * grain).clamp(0.0, 1.0)


class RealisticDefects(AnomalyGenerator):
    """Spots, cracks and scratches, or real defect crops, pasted onto a good image (see the module docstring).

    ``count``: defects per image (inclusive range); ``*_size``: length (crack, scratch), radius
    (spot) or longer side (crop) as fractions of the image's shorter side.
    """

    def __init__(
        self,
        kinds: Sequence[str] = DEFECT_KINDS,
        count: tuple[int, int] = (1, 3),
        crops: Sequence[DefectCrop] | None = None,
        crop_share: float = 1.0,
        spot_size: tuple[float, float] = (0.015, 0.06),
        crack_size: tuple[float, float] = (0.1, 0.4),
        scratch_size: tuple[float, float] = (0.2, 0.6),
        crop_size: tuple[float, float] = (0.05, 0.25),
        avoid_background: bool = False,
        threshold: float = 0.1,
        rotate: bool = False,
        max_angle: float = 10.0,
    ) -> None:
        super().__init__(rotate, max_angle)
        unknown = [k for k in kinds if k not in DEFECT_KINDS]
        if unknown or not kinds:
            raise ConfigError(
                f"defect kinds must be some of {', '.join(DEFECT_KINDS)}, got {', '.join(kinds) or 'none'}"
            )
        if not 1 <= count[0] <= count[1]:
            raise ConfigError(f"need 1 <= min count <= max count of defects, got {count}")
        if not 0.0 <= crop_share <= 1.0:
            raise ConfigError(f"crop_share must be in [0, 1], got {crop_share}")
        self.kinds = tuple(kinds)
        self.count = count
        self.crops = list(crops or [])
        self.crop_share = crop_share if self.crops else 0.0
        self.sizes = {"spot": spot_size, "crack": crack_size, "scratch": scratch_size}
        self.crop_size = crop_size
        self.avoid_background = avoid_background
        self.threshold = threshold

    def alter(self, image: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        allowed = foreground_mask(image, self.threshold) if self.avoid_background else None
        return self.paste(image, rng, allowed)

    def paste(
        self, image: torch.Tensor, rng: torch.Generator, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [3, H, W]`` with 1 or more defects -> (image, mask ``[H, W]`` float {0, 1}, never empty).

        ``allowed``: ``[H, W]`` bool, the pixels a defect may be centred on (None or empty: anywhere).
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise ConfigError(f"expected one [3,H,W] image, got {tuple(image.shape)}")
        _, h, w = image.shape
        centres = allowed.nonzero() if allowed is not None else None
        if centres is not None and len(centres) == 0:
            centres = None
        out = image.float().clone()
        mask = out.new_zeros(h, w)
        for _ in range(randint(rng, self.count[0], self.count[1] + 1)):
            if centres is not None:
                cy, cx = (float(v) + 0.5 for v in centres[randint(rng, 0, len(centres))])
            else:
                cy, cx = uniform(rng, 0.0, float(h)), uniform(rng, 0.0, float(w))
            if self.crop_share > 0 and uniform(rng, 0.0, 1.0) < self.crop_share:
                crop = self.crops[randint(rng, 0, len(self.crops))]
                out, m = paste_crop(out, crop, (cy, cx), rng, self.crop_size)
            else:
                out, m = self._draw(out, (cy, cx), rng)
            mask = torch.maximum(mask, m)
        return out.clamp(0.0, 1.0), mask

    def _draw(
        self, image: torch.Tensor, centre: tuple[float, float], rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        kind = self.kinds[randint(rng, 0, len(self.kinds))]
        size = self.sizes[kind]
        if kind == "spot":
            alpha = spot_alpha(h, w, centre, rng, size)
            tone = ("dark", "dark", "bright", "tinted")[randint(rng, 0, 4)]
        elif kind == "crack":
            alpha = crack_alpha(h, w, centre, rng, size)
            tone = "dark"
        else:
            alpha = scratch_alpha(h, w, centre, rng, size)
            tone = ("dark", "bright")[randint(rng, 0, 2)]
        colour = defect_colour(image, alpha, tone, rng)
        a = alpha[None]
        return image * (1.0 - a) + colour * a, (alpha > 0).float()
