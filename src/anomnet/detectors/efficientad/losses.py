"""EfficientAD's training losses and Collaborative Discrepancy Optimization (CDO, Cao et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_feature_loss(
    distance: torch.Tensor, quantile: float = 0.999, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the squared errors at or above their ``quantile`` (EfficientAD's hard-feature loss).

    ``distance``: ``[B,C,H,W]`` element-wise squared errors. ``mask`` (``[B,H,W]`` bool), when
    given, keeps only those positions (e.g. the normal pixels of an image with a synthetic defect).
    """
    values = distance.permute(0, 2, 3, 1)[mask] if mask is not None else distance
    values = values.reshape(-1)
    if values.numel() == 0:
        return distance.sum() * 0.0
    return values[values >= quantile_value(values.detach(), quantile)].mean()


def quantile_value(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for a 1-D tensor of any length.

    torch.quantile refuses inputs above 16M elements; two ``kthvalue`` calls do not. A high quantile
    (the hard-feature loss' 0.999) reads the same two order statistics from one ``topk`` of the few
    largest values, several times faster than two ``kthvalue`` passes.
    """
    n = values.numel()
    pos = q * (n - 1)
    k = int(pos)
    if 8 * (n - k) <= n:  # the (k+1)-th and (k+2)-th smallest are the last two of the n-k largest
        top = values.topk(n - k).values
        lo = top[-1]
        return lo if k + 1 >= n else lo + (pos - k) * (top[-2] - lo)
    lo = values.kthvalue(k + 1).values
    if k + 1 >= n:
        return lo
    hi = values.kthvalue(k + 2).values
    return lo + (pos - k) * (hi - lo)


def discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``[B,H,W]`` squared distance of the L2-normalised feature vectors (``[B,C,H,W]`` inputs), in [0, 4]."""
    return (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).pow(2).sum(1)


def cdo_loss(
    teacher: torch.Tensor, student: torch.Tensor, anomalous: torch.Tensor, gamma: float = 2.0, eps: float = 1e-12
) -> torch.Tensor:
    """CDO: ``(sum w_N d_N - sum w_A d_A) / (sum w_N + sum w_A)``.

    ``d`` = :func:`discrepancy`; ``anomalous`` (``[B,H,W]`` bool) marks synthetic-defect positions.
    Normal weights ``w_N = (d / mean d_N)^gamma`` stress the worst-fitted normal positions,
    anomalous weights ``w_A = (d / mean d_A)^-gamma`` the anomalous positions that are still too
    close to the teacher. Weights are constants (no gradient), as in the authors' code. With no
    anomalous position the loss is the weighted mean normal discrepancy.
    """
    d = discrepancy(teacher, student)
    anomalous = anomalous.bool()
    d_n, d_a = d[~anomalous], d[anomalous]
    num = d.new_zeros(())
    den = d.new_zeros(())
    if d_n.numel():
        w_n = (d_n.detach() / (d_n.detach().mean() + eps)).pow(gamma)
        num = num + (w_n * d_n).sum()
        den = den + w_n.sum()
    if d_a.numel():
        w_a = ((d_a.detach() + eps) / (d_a.detach().mean() + eps)).pow(-gamma)
        num = num - (w_a * d_a).sum()
        den = den + w_a.sum()
    return num / den.clamp_min(eps)


def penalty_loss(student_features: torch.Tensor) -> torch.Tensor:
    """EfficientAD's penalty on generic images: the mean squared student output (teacher half)."""
    return student_features.pow(2).mean()


def weighted_total(losses: dict[str, torch.Tensor], coefficients: dict[str, float]) -> torch.Tensor:
    """``sum coefficients[name] * losses[name]`` in the order of ``losses`` (a missing coefficient counts 1).

    A coefficient of exactly 1 leaves its term as it is, so the all-ones default adds the very same
    floating-point values as the unweighted sum.
    """
    total: torch.Tensor | None = None
    for name, value in losses.items():
        w = coefficients.get(name, 1.0)
        term = value if w == 1.0 else value * w
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no loss terms")
    return total
