"""CPR's foreground estimation: a linear foreground score per location, fitted without labels.

Fit (training features ``[N, d, h, w]`` of the descriptor level): two k-means clusters of the
locations; the cluster most frequent in a thin border band is the background. Locations of
that cluster in the border band and locations of the other cluster in the central square are
the two classes of a Fisher linear discriminant; its score, scaled so that the 1 % and 99 %
quantiles of the training locations map to 0 and 1 and clipped, is the foreground weight.

Whether the images show an object on a background at all (``object_like``): the mean weight
of the central square exceeds that of a ring inside the border (from the second cell to 1/8 of
the side in; the outermost cells are skipped, the backbone's zero padding alters them on any
image) by at least ``OBJECT_GAP``. Measured on the training images at 256 px (docs/cpr.md): the
eight PIPED paper textures 0.00-0.01, MVTec bottle 0.55. On a texture the branch is not used
(setting ``foreground=auto``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from anomnet.components.kmeans import kmeans, nearest_centroid

BORDER = 3 / 80  # width of the border band, share of the side (the paper's)
CENTRE = 1 / 5  # half side of the central square, share of the side (the paper's)
OBJECT_GAP = 0.25  # object-like: mean weight of the centre minus that of the inner ring at least this
MIN_SAMPLES = 16  # fewest locations per class for the discriminant


@dataclass
class ForegroundFit:
    """What the fit found (recorded in the fit record)."""

    border_share: float  # share of the border band in the background cluster
    centre_share: float  # share of the central square in the background cluster
    ring_weight: float  # mean foreground weight of the inner ring
    centre_weight: float  # mean foreground weight of the central square
    object_like: bool
    fitted: bool  # the discriminant could be fitted (enough locations of both classes)


def region_masks(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[h, w]`` bool masks of the border band and of the central square."""
    by, bx = max(1, int(BORDER * h)), max(1, int(BORDER * w))
    border = torch.ones(h, w, dtype=torch.bool)
    border[by : h - by, bx : w - bx] = False
    cy0, cy1 = int(h / 2 - CENTRE * h), int(h / 2 + CENTRE * h)
    cx0, cx1 = int(w / 2 - CENTRE * w), int(w / 2 + CENTRE * w)
    centre = torch.zeros(h, w, dtype=torch.bool)
    centre[max(0, cy0) : max(cy0 + 1, cy1), max(0, cx0) : max(cx0 + 1, cx1)] = True
    return border, centre


def inner_ring(h: int, w: int) -> torch.Tensor:
    """``[h, w]`` bool: the cells from the second one to ``max(2, side / 8)`` in from the border."""
    ey, ex = max(2, h // 8), max(2, w // 8)
    ring = torch.zeros(h, w, dtype=torch.bool)
    ring[1 : h - 1, 1 : w - 1] = True
    ring[ey + 1 : h - ey - 1, ex + 1 : w - ex - 1] = False
    return ring


def fisher_discriminant(neg: torch.Tensor, pos: torch.Tensor, shrink: float = 1e-3) -> tuple[torch.Tensor, float]:
    """``(w, b)`` of the two-class Fisher discriminant: ``w = S^-1 (mu_pos - mu_neg)``, ``b`` the midpoint.

    ``S`` is the pooled within-class covariance, regularised by ``shrink`` x its mean variance.
    """
    mu0, mu1 = neg.double().mean(0), pos.double().mean(0)
    c0, c1 = neg.double() - mu0, pos.double() - mu1
    cov = (c0.T @ c0 + c1.T @ c1) / max(1, len(neg) + len(pos) - 2)
    d = cov.shape[0]
    cov = cov + shrink * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(d, dtype=cov.dtype)
    w = torch.linalg.solve(cov, mu1 - mu0)
    b = -float(w @ (mu0 + mu1)) / 2.0
    return w.float(), b


class ForegroundBranch(nn.Module):
    """Descriptor features ``[B, d, h, w]`` -> foreground weights ``[B, h, w]`` in [0, 1].

    Buffers, None until a fit finds the discriminant: ``weight`` ``[d]`` and ``scalars`` (bias, the
    scores mapped to 0 and 1, object-like 0 / 1). Without them every weight is 1.
    """

    weight: torch.Tensor | None
    scalars: torch.Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", None)
        self.register_buffer("scalars", None)

    @property
    def object_like(self) -> bool:
        return self.scalars is not None and bool(self.scalars[3] > 0.5)

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.scalars is None:
            return desc.new_ones(desc.shape[0], *desc.shape[-2:])
        bias, low, high = self.scalars[:3].tolist()
        score = torch.einsum("bdhw,d->bhw", desc, self.weight.to(desc)) + bias
        return ((score - low) / (high - low)).clamp(0.0, 1.0)

    def fit(self, desc: torch.Tensor, generator: torch.Generator, max_samples: int = 50_000) -> ForegroundFit:
        """Fit on training features ``[N, d, h, w]`` (see the module docstring)."""
        n, d, h, w = desc.shape
        flat = desc.permute(0, 2, 3, 1).reshape(-1, d).float()
        pick = torch.randperm(len(flat), generator=generator)[:max_samples]
        centroids = kmeans(flat[pick], 2, generator, iterations=10)
        codes = nearest_centroid(flat, centroids)[1].reshape(n, h, w)
        border, centre = region_masks(h, w)
        background = int(torch.bincount(codes[:, border].reshape(-1), minlength=2).argmax())
        is_bg = codes == background
        border_share = float(is_bg[:, border].float().mean())
        centre_share = float(is_bg[:, centre].float().mean())
        rows = flat.reshape(n, h, w, d)
        neg, pos = rows[is_bg & border], rows[~is_bg & centre]
        self.weight = self.scalars = None
        if len(neg) < MIN_SAMPLES or len(pos) < MIN_SAMPLES:
            return ForegroundFit(border_share, centre_share, float("nan"), float("nan"), False, False)
        neg = neg[torch.randperm(len(neg), generator=generator)[:15_000]]
        pos = pos[torch.randperm(len(pos), generator=generator)[:15_000]]
        weight, bias = fisher_discriminant(neg, pos)
        score = flat[pick] @ weight + bias
        low, high = (float(v) for v in torch.quantile(score, torch.tensor([0.01, 0.99])))
        self.weight = weight
        self.scalars = torch.tensor([bias, low, max(high, low + 1e-6), 0.0])
        weights = self(desc)
        ring_weight = float(weights[:, inner_ring(h, w)].mean())
        centre_weight = float(weights[:, centre].mean())
        self.scalars[3] = float(centre_weight - ring_weight >= OBJECT_GAP)
        return ForegroundFit(border_share, centre_share, ring_weight, centre_weight, self.object_like, True)
