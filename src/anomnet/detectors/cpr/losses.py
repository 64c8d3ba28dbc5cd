"""CPR's training loss on the local retrieval features, as pure functions.

A training pair is a query image (a good image, usually with a pasted defect) and one of its
globally retrieved training images. Points are pixel positions ``(y, x)`` of the ``S x S``
inputs; features are read at them bilinearly (:func:`features_at`). With ``s`` the cosine
similarity of the query's and the reference's features at the paired points:

* positive pairs (normal query pixel, same place in the reference):
  ``L_pos = sum((max(0, pos_margin - s) * w)^p) / #(w > 0)``
* negative pairs (defect pixel and the same place; or, on objects, two different places):
  ``L_neg = sum((max(0, s - neg_margin) * w)^p) / #(w > 0)``

with ``p = loss_power`` (3 in the paper) and weights ``w`` (0 marks padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def features_at(features: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, D, n]``: ``features [B, D, h, w]`` read bilinearly at ``points [B, n, 2]`` (pixel y, x at ``size``)."""
    h, w = size
    grid = torch.stack([(points[..., 1] + 0.5) / w * 2.0 - 1.0, (points[..., 0] + 0.5) / h * 2.0 - 1.0], dim=-1)
    return F.grid_sample(features, grid[:, :, None].to(features.dtype), mode="bilinear", align_corners=False)[..., 0]


def hinge_power(
    similarity: torch.Tensor, weight: torch.Tensor, margin: float, power: int, positive: bool
) -> torch.Tensor:
    """``sum((max(0, +-(margin - s)) * w)^p) / #(w > 0)``: positive pairs pulled above ``margin``, others below."""
    gap = (margin - similarity) if positive else (similarity - margin)
    count = (weight > 0).sum().clamp_min(1)
    return (gap.clamp_min(0.0) * weight).pow(power).sum() / count


def retrieval_loss(
    query: torch.Tensor,
    reference: torch.Tensor,
    pos_points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    neg_points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    size: tuple[int, int],
    pos_margin: float = 0.8,
    neg_margin: float = -0.2,
    power: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_pos, L_neg)`` of one level: ``query`` / ``reference`` features ``[B, D, h, w]``; each of
    ``pos_points`` / ``neg_points`` is ``(query points [B, n, 2], reference points [B, n, 2], weights [B, n])``."""
    qp, rp, wp = pos_points
    qn, rn, wn = neg_points
    sim_pos = F.cosine_similarity(features_at(query, qp, size), features_at(reference, rp, size), dim=1)
    sim_neg = F.cosine_similarity(features_at(query, qn, size), features_at(reference, rn, size), dim=1)
    return (
        hinge_power(sim_pos, wp, pos_margin, power, positive=True),
        hinge_power(sim_neg, wn, neg_margin, power, positive=False),
    )


def distance_weights(query: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Hard-negative weights ``[B, n]``: the squared distance of the frozen features ``[B, D, n]`` at the
    paired points, rescaled so that each image's valid weights keep their count as their sum (0 elsewhere)."""
    d2 = (query - reference).pow(2).sum(1) * valid
    return d2 / d2.sum(1, keepdim=True).clamp_min(1e-7) * valid.sum(1, keepdim=True)
