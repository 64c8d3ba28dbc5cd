"""SimSiam heads (Chen & He, CVPR 2021) for ToCoAD's stage II: one projector and predictor per level.

Each of the (two deepest) memory-bank levels gets its own head on its globally pooled feature,
so a level's gradient is not mixed with, or drowned by, the other's; the loss is the mean of the
per-level symmetric stop-gradient losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LevelHead(nn.Module):
    """Projector (3-layer MLP, last BatchNorm without affine) and predictor of one level.

    ``pred_dim`` 0 (the default): the paper's one-layer predictor, a linear map
    ``proj_dim -> proj_dim``; ``pred_dim > 0``: SimSiam's bottleneck MLP
    ``proj_dim -> pred_dim -> proj_dim`` (BN, ReLU in between).
    """

    def __init__(self, in_dim: int, proj_dim: int = 256, pred_dim: int = 0) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False),
        )  # fmt: skip
        self.predictor: nn.Module
        if pred_dim:
            self.predictor = nn.Sequential(
                nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                nn.Linear(pred_dim, proj_dim),
            )  # fmt: skip
        else:
            self.predictor = nn.Linear(proj_dim, proj_dim)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, h, w]`` -> (z, p): projection and prediction of the level's global average."""
        z = self.projector(F.adaptive_avg_pool2d(feature, 1).flatten(1))
        return z, self.predictor(z)


class SimSiamHead(nn.Module):
    """One :class:`LevelHead` per level (``in_dims``: the levels' channels, in the order they are given)."""

    def __init__(self, in_dims: Sequence[int], proj_dim: int = 256, pred_dim: int = 0) -> None:
        super().__init__()
        self.levels = nn.ModuleList(LevelHead(c, proj_dim, pred_dim) for c in in_dims)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(z, p)] of one view, one pair per level."""
        if len(levels) != len(self.levels):
            raise ValueError(f"SimSiamHead has {len(self.levels)} level heads, got {len(levels)} levels")
        return [head(f) for head, f in zip(self.levels, levels)]


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``.

    The projections are the targets: the stop-gradient (``detach``) means no gradient reaches
    them (nor, through them, the projector branch); only the predictor branch is pulled.
    """
    return -0.5 * (
        F.cosine_similarity(p1, z2.detach(), dim=-1).mean() + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
    )


def multilevel_simsiam_loss(
    view1: Sequence[tuple[torch.Tensor, torch.Tensor]], view2: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Mean over levels of :func:`simsiam_loss` (``view1``, ``view2``: :class:`SimSiamHead` outputs)."""
    losses = [simsiam_loss(p1, p2, z1, z2) for (z1, p1), (z2, p2) in zip(view1, view2, strict=True)]
    return torch.stack(losses).mean()
