"""How a detector turns its anomaly map (or patch scores) into one image score: one implementation each.

* :func:`max_score`: the maximum of the map;
* :func:`top_share_mean`: the mean of the highest ``top_share`` of the map's pixels (``k`` = the
  share of the pixel count rounded down, at least 1), the map's maximum for ``top_share`` 0; the
  setting is called ``top_share`` in every detector that has it;
* :func:`reweighted_max`: PatchCore's eq. 7, the maximum patch score re-weighted by how well its
  nearest memory-bank patch is supported by the bank.

With tiling (:mod:`anomnet.tiling`), ``tile_score="tile"`` takes the maximum of these per-tile
scores; ``tile_score="map"`` takes :func:`max_score` of the stitched map instead.
"""

from __future__ import annotations

import torch

from anomnet.components.nn_search import NearestNeighbors


def max_score(maps: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` -> ``[B]``: the maximum of each map."""
    return maps.flatten(1).amax(1)


def top_share_mean(maps: torch.Tensor, top_share: float) -> torch.Tensor:
    """``[B, ...]`` -> ``[B]``: the mean of each map's ``max(1, floor(top_share * pixels))`` highest pixels;
    the maximum for ``top_share`` 0."""
    if top_share <= 0:
        return max_score(maps)
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * top_share))
    return flat.topk(k, dim=1).values.mean(1)


def reweighted_max(
    feats: torch.Tensor,
    patch_scores: torch.Tensor,
    nearest: torch.Tensor,
    bank: torch.Tensor,
    search: NearestNeighbors,
    num_neighbors: int,
) -> torch.Tensor:
    """Re-weighted maximum patch score (PatchCore eq. 7): ``s = (1 - softmax(distances)_0) * s*``.

    ``feats`` ``[B, N, D]`` test patches, ``patch_scores`` ``[B, N]`` their distances to their
    nearest ``bank`` rows ``nearest`` ``[B, N]``; ``search`` the bank's index. ``s*`` is the largest
    patch score, ``m*`` the bank patch nearest to that test patch; the softmax runs over the test
    patch's distances to ``m*`` and ``m*``'s ``num_neighbors - 1`` nearest bank neighbours.
    """
    best = patch_scores.argmax(1)
    rows = torch.arange(feats.shape[0])
    s_star = patch_scores[rows, best]
    k = min(num_neighbors, len(search))
    if k < 2:
        return s_star
    m_test = feats[rows, best]  # [B, D] the most anomalous test patch
    m_star = bank[nearest[rows, best]]  # its nearest bank patch
    _, support = search.search(m_star, k)  # neighbours of m* in the bank (m* itself first)
    dists = torch.linalg.vector_norm(m_test[:, None, :] - bank[support], dim=-1)
    weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
    return weight * s_star
