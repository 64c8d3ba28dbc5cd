"""The module PatchCore predicts with: patch features, the memory bank and its search index, scoring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from anomnet.components import NearestNeighbors, PatchFeatures, gaussian_blur
from anomnet.errors import ConfigError, NotFittedError
from anomnet.transforms import upsample_maps


class PatchCoreModel(nn.Module):
    """Images -> (image scores ``[B]``, smoothed patch-distance maps ``[B, H, W]``)."""

    def __init__(self, features: PatchFeatures, num_neighbors: int = 9, blur_sigma: float = 4.0) -> None:
        super().__init__()
        self.features = features
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.memory_bank: torch.Tensor | None = None
        self.nn: NearestNeighbors | None = None
        # index of the training image each bank row came from (leave-one-image-out scoring); None: unknown
        self.bank_owner: torch.Tensor | None = None

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> patch features ``[B, h, w, D]``."""
        with torch.inference_mode():
            return self.features(images).permute(0, 2, 3, 1).contiguous()

    def set_bank(self, bank: torch.Tensor, backend: str, probe: int, centroids: torch.Tensor | None = None) -> None:
        self.memory_bank = bank
        self.nn = NearestNeighbors(bank, backend, probe, centroids)

    @contextlib.contextmanager
    def leave_out(self, owners: Sequence[int]) -> Iterator[None]:
        """Within the block the bank lacks the rows of the training images ``owners``.

        Every search (the nearest bank patch and eq. 7's support) then runs on the rest of the bank
        the way it runs on the whole one (an IVF index keeps its cells), so any predict path (tiling,
        rotations, padding) scores an image as if it had not been in the bank's training set.
        """
        if self.nn is None or self.memory_bank is None:
            raise NotFittedError("PatchCore is not fitted: call fit() or load a saved model")
        if self.bank_owner is None:
            raise ConfigError("this model does not record which training image each bank patch came from")
        keep = ~torch.isin(self.bank_owner, torch.as_tensor(list(owners), dtype=self.bank_owner.dtype))
        saved = (self.memory_bank, self.nn)
        if not bool(keep.all()):
            self.memory_bank, self.nn = saved[0][keep], saved[1].subset(keep)
        try:
            yield
        finally:
            self.memory_bank, self.nn = saved

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.nn is None or self.memory_bank is None:
            raise NotFittedError("PatchCore is not fitted: call fit() or load a saved model")
        feats = self.extract(images)
        b, h, w, d = feats.shape
        flat = feats.reshape(-1, d)
        dist, idx = self.nn.search(flat, 1)
        patch_scores = dist[:, 0].reshape(b, h * w)
        nearest = idx[:, 0].reshape(b, h * w)
        scores = self.image_scores(flat.reshape(b, h * w, d), patch_scores, nearest)
        maps = upsample_maps(patch_scores.reshape(b, h, w), (int(images.shape[-2]), int(images.shape[-1])))
        return scores, gaussian_blur(maps, self.blur_sigma)

    def image_scores(self, feats: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Re-weighted maximum patch score (PatchCore eq. 7): ``s = (1 - softmax(distances)_0) * s*``."""
        if self.nn is None or self.memory_bank is None:
            raise NotFittedError("PatchCore is not fitted: call fit() or load a saved model")
        best = patch_scores.argmax(1)
        rows = torch.arange(feats.shape[0])
        s_star = patch_scores[rows, best]
        k = min(self.num_neighbors, len(self.nn))
        if k < 2:
            return s_star
        m_test = feats[rows, best]  # [B, D] the most anomalous test patch
        m_star = self.memory_bank[nearest[rows, best]]  # its nearest bank patch
        _, support = self.nn.search(m_star, k)  # neighbours of m* in the bank (m* itself first)
        dists = torch.linalg.vector_norm(m_test[:, None, :] - self.memory_bank[support], dim=-1)
        weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weight * s_star
