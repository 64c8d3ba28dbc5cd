"""The discriminator's loss on the 2-channel anomaly-mask prediction: focal loss (Lin et al. 2017, the default)
or plain cross-entropy (the paper's Table 6 compares the two)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DiscLoss = Literal["focal", "cross_entropy"]


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Mean over pixels of ``-a_t (1 - p_t)^gamma log p_t``.

    Args:
        logits: ``[B, 2, H, W]`` (channel 0 normal, channel 1 anomalous).
        target: ``[B, H, W]`` mask (1 anomalous, 0 normal; fractions are rounded).
        gamma: focusing parameter (0 gives the cross-entropy).
        alpha: weight of the anomalous class (``1 - alpha`` for the normal one); ``None``: both 1.
    """
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"focal_loss expects [B,2,H,W] logits, got {tuple(logits.shape)}")
    labels = (target > 0.5).long()
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, labels[:, None])[:, 0]
    pt = log_pt.exp()
    loss = -((1.0 - pt) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * torch.where(labels == 1, alpha, 1.0 - alpha)
    return loss.mean()


def discriminator_loss(
    logits: torch.Tensor, target: torch.Tensor, kind: DiscLoss, gamma: float, alpha: float | None
) -> torch.Tensor:
    """``kind="focal"``: :func:`focal_loss` with ``gamma`` and ``alpha``; ``"cross_entropy"``: the unweighted
    pixel cross-entropy (``gamma`` and ``alpha`` unused), the alternative of the paper's Table 6."""
    return focal_loss(logits, target, gamma, alpha) if kind == "focal" else focal_loss(logits, target, 0.0, None)
