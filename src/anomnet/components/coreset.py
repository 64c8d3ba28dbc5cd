"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

Distances are computed in a random projection of the features (Johnson-Lindenstrauss), which
keeps each greedy step a single matrix-vector product over the bank.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from anomnet.errors import ConfigError


def random_projection(features: torch.Tensor, dim: int, seed: int = 0, chunk: int = 65536) -> torch.Tensor:
    """Project ``[N, D]`` features to ``dim`` dimensions with a seeded Gaussian matrix (identity if ``dim >= D``)."""
    n, d = features.shape
    if dim <= 0 or dim >= d:
        return features
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(d, dim, generator=g) / math.sqrt(dim)
    out = torch.empty(n, dim)
    for s in range(0, n, chunk):
        torch.mm(features[s : s + chunk].float(), matrix, out=out[s : s + chunk])
    return out


def greedy_coreset(
    features: torch.Tensor,
    count: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Indices of ``count`` points chosen by greedy k-center (farthest-point) selection.

    Each new point is the one farthest from all points chosen so far. The first point is
    drawn at random with ``seed``. Returns int64 indices in selection order.
    """
    n = features.shape[0]
    if not count >= 1:
        raise ConfigError(f"coreset size must be at least 1, got {count}")
    if count >= n:
        return torch.arange(n)
    x = random_projection(features, projection_dim, seed)
    sq = (x * x).sum(1)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=g))
    min_d = torch.full((n,), math.inf)
    dots = torch.empty(n)
    bar = tqdm(total=count, desc="coreset", unit="pt", disable=not progress, mininterval=1.0, leave=False)
    for i in range(count):
        if i > 0:
            chosen[i] = torch.argmax(min_d)
        c = x[chosen[i]]
        torch.mv(x, c, out=dots)
        # squared distance |x|^2 - 2 x.c + |c|^2, folded into the running minimum in place
        dots.mul_(-2.0).add_(sq).add_(sq[chosen[i]])
        torch.minimum(min_d, dots, out=min_d)
        bar.update(1)
    bar.close()
    return chosen
