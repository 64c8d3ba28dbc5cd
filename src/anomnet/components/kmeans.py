"""k-means (k-means++ seeding and Lloyd iterations) and the chunked nearest-centroid search it uses."""

from __future__ import annotations

import torch

from anomnet.components.graph_mode import graph_mode_active


def nearest_centroid(
    feats: torch.Tensor, centroids: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to the nearest centroid ``[N]`` and its index ``[N]``, without autograd.

    ``min_k ||f||^2 - 2 f.C_k + ||C_k||^2`` row chunk by row chunk (one fused ``addmm`` per chunk,
    the ``[chunk, K]`` block stays in cache). In graph mode (:mod:`.graph_mode`) all rows at once, so
    a traced graph takes any batch.
    """
    with torch.no_grad():
        c2 = (centroids * centroids).sum(1)[None]
        if graph_mode_active():
            best = torch.addmm(c2, feats, centroids.T, beta=1.0, alpha=-2.0).min(1)
            return (best.values + (feats * feats).sum(1)).clamp_min(0.0), best.indices
        dist = torch.empty(feats.shape[0], dtype=feats.dtype, device=feats.device)
        index = torch.empty(feats.shape[0], dtype=torch.long, device=feats.device)
        for start in range(0, feats.shape[0], chunk):
            f = feats[start : start + chunk]
            best = torch.addmm(c2, f, centroids.T, beta=1.0, alpha=-2.0).min(1)
            dist[start : start + chunk] = best.values + (f * f).sum(1)
            index[start : start + chunk] = best.indices
        return dist.clamp_min_(0.0), index


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 10) -> torch.Tensor:
    """k-means++ seeding (``iterations=0``: seeds only) followed by Lloyd iterations; ``[k, D]``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: repeat a random point
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(closest / total, 1, generator=generator))
        centers.append(x[idx])
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centers).clone()
    for _ in range(iterations):
        assign = nearest_centroid(x, c)[1]
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c
