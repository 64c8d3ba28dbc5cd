"""CutPaste (Li et al., CVPR 2021): a recoloured rectangle of the image pasted at another place."""

from __future__ import annotations

import math

import torch

from anomnet.synthesis.base import AnomalyGenerator, randint, uniform


class CutPaste(AnomalyGenerator):
    """Cut a rectangle (``area`` fraction of the image, aspect ratio log-uniform in ``aspect``),
    jitter its brightness, contrast and colour balance, paste it at a random other place.
    The mask is the pasted rectangle."""

    def __init__(
        self,
        area: tuple[float, float] = (0.02, 0.15),
        aspect: tuple[float, float] = (0.3, 3.3),
        jitter: float = 0.1,
        rotate: bool = False,
        max_angle: float = 10.0,
    ) -> None:
        super().__init__(rotate, max_angle)
        self.area = area
        self.aspect = aspect
        self.jitter = jitter

    def alter(self, image: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        area = uniform(rng, *self.area) * h * w
        ratio = math.exp(uniform(rng, math.log(self.aspect[0]), math.log(self.aspect[1])))
        ph = max(1, min(h - 1, int(round(math.sqrt(area * ratio)))))
        pw = max(1, min(w - 1, int(round(math.sqrt(area / ratio)))))
        sy, sx = randint(rng, 0, h - ph + 1), randint(rng, 0, w - pw + 1)
        patch = image[:, sy : sy + ph, sx : sx + pw]
        j = self.jitter
        gain = torch.tensor([uniform(rng, 1 - j, 1 + j) for _ in range(3)]).view(3, 1, 1)
        mean = patch.mean()
        patch = ((patch - mean) * uniform(rng, 1 - j, 1 + j) + mean) * gain + uniform(rng, -j, j)
        # paste somewhere else: draw until the target differs from the source (or give up after a few)
        for _ in range(10):
            ty, tx = randint(rng, 0, h - ph + 1), randint(rng, 0, w - pw + 1)
            if (ty, tx) != (sy, sx):
                break
        out = image.clone()
        out[:, ty : ty + ph, tx : tx + pw] = patch.clamp(0.0, 1.0)
        mask = torch.zeros(h, w)
        mask[ty : ty + ph, tx : tx + pw] = 1.0
        return out, mask
