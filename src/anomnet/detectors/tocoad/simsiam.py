"""SimSiam head (Chen & He, CVPR 2021) on pooled multi-level features, with its stop-gradient loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimSiamHead(nn.Module):
    """Projector (3-layer MLP) and predictor (2-layer bottleneck MLP).

    The input is the concatenation of the adaptive-average-pooled (global) features of each
    level; the same projector serves both views (shared weights).
    """

    def __init__(self, in_dim: int, proj_dim: int = 256, pred_dim: int = 64) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False),
        )  # fmt: skip
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim),
        )  # fmt: skip

    @staticmethod
    def pool(levels: list[torch.Tensor]) -> torch.Tensor:
        """``[B, sum C]``: each level ``[B, C, h, w]`` averaged over its locations, concatenated."""
        return torch.cat([F.adaptive_avg_pool2d(f, 1).flatten(1) for f in levels], dim=1)

    def forward(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, p): projection and prediction of one view."""
        z = self.projector(self.pool(levels))
        return z, self.predictor(z)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``.

    The projections are the targets: the stop-gradient (``detach``) means no gradient reaches
    them (nor, through them, the projector branch); only the predictor branch is pulled.
    """
    return -0.5 * (
        F.cosine_similarity(p1, z2.detach(), dim=-1).mean() + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
    )
