"""The point pairs CPR's loss trains on, drawn per training pair (query image, retrieved reference).

* positive: ``n`` normal pixels of the query (outside the pasted defect), drawn with
  probability ``weights`` (the sharpened foreground; uniform without), paired with the same
  place in the reference;
* anomalous: up to ``n`` pixels of the pasted defect, paired with the same place;
* negative (objects only): ``n`` normal reference pixels paired with random query pixels at
  least ``min_shift`` pixels away (different parts of the object must not match).

Fewer points than ``n`` are padded with weight 0 so a batch stays one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PointPairs:
    """Query points ``[B, n, 2]``, reference points ``[B, n, 2]`` (pixel y, x) and weights ``[B, n]``."""

    query: torch.Tensor
    reference: torch.Tensor
    weight: torch.Tensor

    @staticmethod
    def cat(a: PointPairs, b: PointPairs) -> PointPairs:
        return PointPairs(
            torch.cat([a.query, b.query], 1),
            torch.cat([a.reference, b.reference], 1),
            torch.cat([a.weight, b.weight], 1),
        )


def _draw(prob: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``n`` flat indices drawn without replacement with probability ``prob`` (zeros never)."""
    available = int((prob > 0).sum())
    if available == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(prob, min(n, available), replacement=False, generator=generator)


def _yx(index: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([index // width, index % width], dim=-1).float()


def _pad(points: list[torch.Tensor], others: list[torch.Tensor], n: int) -> PointPairs:
    b = len(points)
    q, r, w = torch.zeros(b, n, 2), torch.zeros(b, n, 2), torch.zeros(b, n)
    for i, (p, o) in enumerate(zip(points, others)):
        q[i, : len(p)], r[i, : len(o)], w[i, : len(p)] = p, o, 1.0
    return PointPairs(q, r, w)


def sample_pairs(
    masks: torch.Tensor,
    weights: torch.Tensor | None,
    n: int,
    generator: torch.Generator,
    negatives: bool = False,
    min_shift: float = 0.0,
) -> tuple[PointPairs, PointPairs, PointPairs | None]:
    """``(positive, anomalous, negative or None)`` pairs for defect masks ``[B, S, S]`` (see the module docstring)."""
    b, h, w = masks.shape
    normal = (masks.reshape(b, -1) <= 0.5).float()
    prob = normal if weights is None else normal * weights.reshape(b, -1).clamp_min(0.0)
    prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, normal)  # foreground all zero: uniform
    pos, anomalous, neg_q, neg_r = [], [], [], []
    for i in range(b):
        pos.append(_yx(_draw(prob[i], n, generator), w))
        anomalous.append(_yx(_draw(1.0 - normal[i], n, generator), w))
        if negatives:
            ref = _yx(_draw(prob[i], n, generator), w)
            query = _yx(torch.randint(h * w, (len(ref),), generator=generator), w)
            far = (query - ref).norm(dim=1) > min_shift
            neg_q.append(query[far])
            neg_r.append(ref[far])
    neg = _pad(neg_q, neg_r, n) if negatives else None
    return _pad(pos, pos, n), _pad(anomalous, anomalous, n), neg
