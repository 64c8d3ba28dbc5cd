"""ToCoAD's predict-time module: PatchCore's memory bank and search on the fine-tuned backbone,
with the paper's eq. 9 re-weighting applied to every patch.

Eq. 9 is PatchCore's eq. 7: a test patch ``m`` with nearest bank patch ``m*`` and distance
``s = ||m - m*||`` scores ``(1 - softmax_b(||m - m_b||)_{m*}) * s``, the softmax over ``m*``
and its ``num_neighbors - 1`` nearest bank neighbours ``m_b``: a patch whose nearest bank patch
lies in a dense, well-supported region of the bank is trusted more than one near an outlier of
the bank. PatchCore applies this weight only to the most anomalous patch (the image score);
ToCoAD (``reweight="patch"``, the default) applies it to every patch, so the map is re-weighted
too and the image score is the maximum of the re-weighted patches. ``reweight="image"`` is
PatchCore's scoring. The discriminator (:mod:`.discriminator`) and the SimSiam heads
(:mod:`.simsiam`) are used only in fit.
"""

from __future__ import annotations

import torch

from anomnet.components import PatchFeatures
from anomnet.components.graph_mode import graph_mode_active
from anomnet.components.score_reduction import max_score
from anomnet.detectors.patchcore.model import PatchCoreModel


class ToCoADModel(PatchCoreModel):
    """Images -> (image scores ``[B]``, smoothed re-weighted patch-distance maps ``[B, H, W]``)."""

    def __init__(
        self,
        features: PatchFeatures,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        reweight: str = "patch",
        chunk: int = 2048,
    ) -> None:
        super().__init__(features, num_neighbors, blur_sigma)
        self.reweight = reweight
        self.chunk = chunk

    def score(
        self, feats: torch.Tensor, distance: torch.Tensor, nearest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9 on every patch and the maximum of the re-weighted patches (``reweight="image"``: PatchCore's)."""
        if self.reweight != "patch":
            return super().score(feats, distance, nearest)
        b, n, d = feats.shape
        patch_scores = self.patch_weights(feats.reshape(-1, d), nearest.reshape(-1)).reshape(b, n) * distance
        return patch_scores, max_score(patch_scores)

    def patch_weights(self, flat: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 9 weight ``[N]`` of every patch ``flat[n]`` whose nearest bank patch is ``nearest[n]``."""
        k = min(self.num_neighbors, len(self.nn))
        if k < 2:
            return torch.ones(flat.shape[0], dtype=flat.dtype)
        if graph_mode_active():  # the same weights with no unique() and no loop over the patches (export)
            support = self.nn.bank_neighbors(nearest, k)  # a lookup in a table of the bank's neighbours
            dists = torch.linalg.vector_norm(flat[:, None, :].float() - self.memory_bank[support], dim=-1)
            return 1.0 - torch.softmax(dists, dim=1)[:, 0]
        # the neighbours of each distinct m* in the bank (m* itself first), searched once per m*
        unique, inverse = torch.unique(nearest, return_inverse=True)
        _, support = self.nn.search(self.memory_bank[unique], k)
        weights = torch.empty(flat.shape[0], dtype=torch.float32)
        for start in range(0, flat.shape[0], self.chunk):
            part = slice(start, start + self.chunk)
            neighbours = self.memory_bank[support[inverse[part]]]  # [n, k, D]
            dists = torch.linalg.vector_norm(flat[part, None, :].float() - neighbours, dim=-1)
            weights[part] = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weights
