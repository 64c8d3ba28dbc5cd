"""The loss functions of AnomNet (Gao et al., J. Imaging 2025, 11, 301), as pure functions.

Notation: ``feats`` are adapted features ``[N, D]``, ``centroids`` are ``[K, D]``.

* :func:`attraction_loss`   L_att = mean_i min_k ||f_i - C_k||^2
* :func:`separation_loss`   L_sep = mean_{k<l} max(0, theta - ||C_k - C_l||)
* :func:`centroid_entropy`  H(C), the differential entropy of a Gaussian fitted to the
  centroids; the loss term is L_ent = -H(C)
* :func:`pseudo_labels`     y_i = argmin_k ||f_i - C_k||
* :func:`contrastive_losses` (L_pos, L_neg) of the centroid-guided contrastive learning on
  L2-normalised features, S = F F^T:
  L_pos = mean over same-label pairs i != j of (1 - S_ij),
  L_neg = mean over different-label pairs of max(0, S_ij - m)
* :func:`sample_rows`       a bounded, seeded subset of rows (the CCL pair matrix is quadratic)
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from anomnet.components.kmeans import nearest_centroid
from anomnet.errors import ConfigError

Entropy = Literal["diag", "logdet"]
ENTROPY_ESTIMATORS: tuple[str, ...] = get_args(Entropy)

__all__ = [
    "ENTROPY_ESTIMATORS",
    "attraction_loss",
    "centroid_distances",
    "centroid_entropy",
    "contrastive_losses",
    "nearest_centroid",
    "pseudo_labels",
    "sample_rows",
    "separation_loss",
    "squared_distances",
]


def squared_distances(feats: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` squared Euclidean distances, clamped at 0 (matrix-product form: O(N K D))."""
    d2 = (feats * feats).sum(1, keepdim=True) - 2.0 * feats @ centroids.T + (centroids * centroids).sum(1)[None]
    return d2.clamp_min_(0.0) if not d2.requires_grad else d2.clamp_min(0.0)


def attraction_loss(feats: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Mean over features of the squared distance to the nearest centroid.

    The nearest centroid is found without autograd; the loss is then the squared distance to
    it, which has the same value and gradient as ``min_k`` but costs O(N D), not O(N K D).
    """
    nearest = pseudo_labels(feats.detach(), centroids.detach())
    diff = feats - torch.index_select(centroids, 0, nearest)  # (index_select: fast backward)
    return (diff * diff).sum(1).mean()


def centroid_distances(centroids: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Distances ``||C_k - C_l||`` of the ``K (K - 1) / 2`` pairs ``k < l`` (finite gradient at 0).

    Matrix-product form (a ``K x K`` product instead of ``K^2 / 2`` difference vectors).
    """
    k = centroids.shape[0]
    i, j = torch.triu_indices(k, k, offset=1, device=centroids.device)
    d2 = squared_distances(centroids, centroids)
    return torch.sqrt(d2[i, j] + eps)


def separation_loss(centroids: torch.Tensor, theta: float) -> torch.Tensor:
    """Mean over centroid pairs of the hinge ``max(0, theta - d(C_k, C_l))``; 0 for one centroid."""
    if centroids.shape[0] < 2:
        return centroids.sum() * 0.0
    return torch.relu(theta - centroid_distances(centroids)).mean()


def centroid_entropy(centroids: torch.Tensor, estimator: str = "diag", eps: float = 1e-6) -> torch.Tensor:
    """Differential entropy of a Gaussian fitted to the ``K`` centroids (in nats).

    The ``D x D`` covariance of ``K < D`` points is singular, so:

    * ``"diag"``: per-dimension variances, ``H = 0.5 * sum_d log(2 pi e (var_d + eps))``;
    * ``"logdet"``: full covariance regularised by ``eps I``,
      ``H = 0.5 * (D log(2 pi e) + logdet(Sigma + eps I))``.

    Variances use the unbiased ``1 / (K - 1)`` normalisation (``1 / K`` when ``K == 1``).
    """
    k, d = centroids.shape
    centred = centroids - centroids.mean(0, keepdim=True)
    denom = max(k - 1, 1)
    const = d * math.log(2.0 * math.pi * math.e)
    if estimator == "diag":
        var = (centred * centred).sum(0) / denom
        return 0.5 * (const + torch.log(var + eps).sum())
    if estimator == "logdet":
        cov = centred.T @ centred / denom
        cov = cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
        return 0.5 * (const + torch.linalg.slogdet(cov).logabsdet)
    raise ConfigError(f"unknown entropy estimator {estimator!r}; use one of {', '.join(ENTROPY_ESTIMATORS)}")


def pseudo_labels(feats: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each feature ``[N]``."""
    return nearest_centroid(feats, centroids)[1]


def contrastive_losses(
    feats: torch.Tensor, labels: torch.Tensor, margin: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_pos, L_neg)`` on L2-normalised features; a term with no pairs is 0."""
    z = torch.nn.functional.normalize(feats, dim=1)
    sim = z @ z.T
    same = (labels[:, None] == labels[None, :]).to(sim.dtype)
    same.fill_diagonal_(0.0)  # pairs i != j only
    n = len(labels)
    # counts from the label histogram: same-label pairs i != j, and different-label pairs
    counts = torch.bincount(labels).to(torch.float64)
    n_pos = float((counts * counts).sum()) - n
    n_neg = float(n * n - (counts * counts).sum())
    different = (labels[:, None] != labels[None, :]).to(sim.dtype)
    l_pos = ((1.0 - sim) * same).sum() / n_pos if n_pos > 0 else sim.sum() * 0.0
    l_neg = (torch.relu(sim - margin) * different).sum() / n_neg if n_neg > 0 else sim.sum() * 0.0
    return l_pos, l_neg


def sample_rows(n: int, max_rows: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Indices of at most ``max_rows`` of ``n`` rows drawn without replacement; ``None`` = all rows."""
    if max_rows <= 0 or n <= max_rows:
        return None
    return torch.randperm(n, generator=generator)[:max_rows]
