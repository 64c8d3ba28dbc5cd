"""Noise patches: 1 to 4 squares of random noise, optionally kept off the background (issue 6, part 5).

The EfficientAD + CDO recipe: with probability 0.4 an image (``synthesize_batch(gen, images, rng,
0.4)``) gets 1 to 4 square patches whose side is 1/40 to 1/10 of the image's shorter side,
filled with uniform noise. With ``avoid_background`` each patch centre lies on the foreground:
pixels whose gray level differs from the border's median by more than ``threshold``, cleaned
by a morphological closing and opening. When there is no foreground, patches go anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomnet.errors import ConfigError
from anomnet.synthesis.base import AnomalyGenerator, randint, uniform


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return ~_dilate(~mask, radius)


def foreground_mask(image: torch.Tensor, threshold: float = 0.1, radius: int | None = None) -> torch.Tensor:
    """``[H,W]`` bool: pixels that differ from the background (the border's median gray) by more
    than ``threshold``, then closed and opened with a square of ``radius`` (default ~1/64 of the side)."""
    gray = image.float().mean(0)
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    fg = (gray - border.median()).abs() > threshold
    r = max(1, min(gray.shape) // 64) if radius is None else radius
    fg = _erode(_dilate(fg, r), r)  # closing: fill small holes
    return _dilate(_erode(fg, r), r)  # opening: drop specks


class NoisePatches(AnomalyGenerator):
    def __init__(
        self,
        min_patches: int = 1,
        max_patches: int = 4,
        min_side: float = 1 / 40,
        max_side: float = 1 / 10,
        avoid_background: bool = True,
        threshold: float = 0.1,
    ) -> None:
        super().__init__(rotate=False)
        if not 1 <= min_patches <= max_patches:
            raise ConfigError(f"need 1 <= min_patches <= max_patches, got {min_patches}, {max_patches}")
        if not 0.0 < min_side <= max_side <= 1.0:
            raise ConfigError(f"need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
        self.min_patches, self.max_patches = min_patches, max_patches
        self.min_side, self.max_side = min_side, max_side
        self.avoid_background = avoid_background
        self.threshold = threshold

    def alter(self, image: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, w = image.shape
        out = image.clone()
        mask = image.new_zeros(h, w)
        centres = None
        if self.avoid_background:
            fg = foreground_mask(image, self.threshold).nonzero()
            centres = fg if len(fg) else None
        for _ in range(randint(rng, self.min_patches, self.max_patches + 1)):
            side = max(1, min(h, w, round(uniform(rng, self.min_side, self.max_side) * min(h, w))))
            if centres is not None:
                cy, cx = (int(v) for v in centres[randint(rng, 0, len(centres))])
            else:
                cy, cx = randint(rng, 0, h), randint(rng, 0, w)
            top = min(max(cy - side // 2, 0), h - side)
            left = min(max(cx - side // 2, 0), w - side)
            out[:, top : top + side, left : left + side] = torch.rand(3, side, side, generator=rng, dtype=image.dtype)
            mask[top : top + side, left : left + side] = 1.0
        return out, mask
