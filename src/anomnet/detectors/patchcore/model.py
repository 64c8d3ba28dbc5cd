"""The module PatchCore predicts with: patch features, the memory bank and its search index, scoring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from anomnet.components import NearestNeighbors, PatchFeatures, gaussian_blur
from anomnet.components.score_reduction import reweighted_max
from anomnet.errors import ConfigError
from anomnet.transforms import upsample_maps


class PatchCoreModel(nn.Module):
    """Images -> (image scores ``[B]``, smoothed patch-distance maps ``[B, H, W]``).

    Buffers: ``memory_bank`` ``[M, D]`` (empty until fit), ``nn_centroids`` (the IVF index's
    cells, ``None`` for an exact search) and ``bank_owner`` ``[M]`` (the training image each bank
    row came from, for leave-one-image-out scoring; ``None``: unknown). ``nn``, the search index,
    is built from them (:meth:`set_bank`). Subclasses change the scoring through :meth:`score`.
    """

    memory_bank: torch.Tensor
    nn_centroids: torch.Tensor | None
    bank_owner: torch.Tensor | None
    nn: NearestNeighbors  # built with the bank

    def __init__(self, features: PatchFeatures, num_neighbors: int = 9, blur_sigma: float = 4.0) -> None:
        super().__init__()
        self.features = features
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.register_buffer("memory_bank", torch.empty(0))
        self.register_buffer("nn_centroids", None)
        self.register_buffer("bank_owner", None)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> patch features ``[B, h, w, D]``."""
        with torch.inference_mode():
            return self.features(images).permute(0, 2, 3, 1).contiguous()

    def set_bank(self, bank: torch.Tensor, backend: str, probe: int, centroids: torch.Tensor | None = None) -> None:
        """The memory bank and its search index (``centroids``: an IVF index's saved cells)."""
        self.memory_bank = bank
        self.nn = NearestNeighbors(bank, backend, probe, centroids)
        self.nn_centroids = self.nn.centroids

    @contextlib.contextmanager
    def leave_out(self, owners: Sequence[int]) -> Iterator[None]:
        """Within the block the bank lacks the rows of the training images ``owners``.

        Every search (the nearest bank patch and eq. 7's support) then runs on the rest of the bank
        the way it runs on the whole one (an IVF index keeps its cells), so any predict path (tiling,
        rotations, padding) scores an image as if it had not been in the bank's training set.
        """
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
        feats = self.extract(images)
        b, h, w, d = feats.shape
        dist, idx = self.nn.search(feats.reshape(-1, d), 1)
        patch_scores, scores = self.score(
            feats.reshape(b, h * w, d), dist[:, 0].reshape(b, -1), idx[:, 0].reshape(b, -1)
        )
        maps = upsample_maps(patch_scores.reshape(b, h, w), (int(images.shape[-2]), int(images.shape[-1])))
        return scores, gaussian_blur(maps, self.blur_sigma)

    def score(
        self, feats: torch.Tensor, distance: torch.Tensor, nearest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores ``[B, N]`` and image scores ``[B]`` of the patches ``feats`` ``[B, N, D]``.

        ``distance`` ``[B, N]`` is each patch's distance to its nearest bank row ``nearest`` ``[B, N]``.
        PatchCore: the distances, and their maximum re-weighted as the paper's eq. 7 does.
        """
        return distance, reweighted_max(feats, distance, nearest, self.memory_bank, self.nn, self.num_neighbors)
