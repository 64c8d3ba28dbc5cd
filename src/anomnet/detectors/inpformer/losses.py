"""INP-Former's losses (Luo et al., CVPR 2025), as pure functions.

* :func:`coherence_loss`   L_c = mean over tokens of ``min_m (1 - cos(f_i, p_m))``: every encoder
  token close to its nearest intrinsic normal prototype (INP) of the same image, so the INPs
  cover the image's normal content.
* :func:`soft_mining_loss` L_sm: the global cosine reconstruction loss of each group,
  ``mean_b (1 - cos(vec(E_b), vec(D_b)))``, whose gradient at each location is re-weighted by
  ``(d / mean d) ** gamma``, ``d`` the location's own ``1 - cos`` distance: hard-to-reconstruct
  normal regions get more of the gradient, easy ones less (gamma = 3 in the paper). The value is
  the plain loss; only the gradient is mined, as in the authors' code (a gradient hook there, a
  straight-through scaling here: :func:`scale_gradient`).
* :func:`cosine_distance_maps` ``1 - cos`` per location of encoder and decoder feature maps,
  the anomaly map of each group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["coherence_loss", "cosine_distance_maps", "scale_gradient", "soft_mining_loss"]


def coherence_loss(tokens: torch.Tensor, inps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_c, d)``: tokens ``[B, N, C]``, the image's INPs ``[B, M, C]``; ``d [B, N]`` the nearest-INP distances."""
    sim = F.normalize(tokens, dim=-1) @ F.normalize(inps, dim=-1).transpose(1, 2)  # [B, N, M]
    distance = 1.0 - sim.amax(dim=-1)
    return distance.mean(), distance


def scale_gradient(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged in value; its gradient multiplied by ``factor`` (broadcast to ``x``)."""
    detached = x.detach()
    return detached + factor * (x - detached)


def cosine_distance_maps(encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` over channels (dim 1) of ``[B, C, ...]`` features: ``[B, ...]``."""
    return 1.0 - F.cosine_similarity(encoder, decoder, dim=1)


def soft_mining_loss(
    encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], gamma: float = 3.0
) -> torch.Tensor:
    """Mean over groups of the soft-mined global cosine loss; ``encoder[g]``, ``decoder[g]``: ``[B, C_g, ...]``.

    The encoder side is a fixed target (no gradient). ``gamma = 0`` is the plain global cosine loss.
    """
    total = encoder[0].new_zeros(())
    for en, de in zip(encoder, decoder, strict=True):
        en = en.detach()
        with torch.no_grad():
            d = cosine_distance_maps(en, de)[:, None]  # [B, 1, ...]
            factor = (d / d.mean().clamp_min(1e-12)) ** gamma
        de = scale_gradient(de, factor)
        total = total + (1.0 - F.cosine_similarity(en.flatten(1), de.flatten(1), dim=1)).mean()
    return total / len(encoder)
