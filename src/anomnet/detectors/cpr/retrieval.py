"""CPR's cascade: global retrieval (which training images) then local retrieval (where in them).

* :class:`GlobalRetrieval`: every location of an image's descriptor level gets its nearest
  codeword (k-means centroids of the training locations); the image descriptor is the codeword
  histogram of each block of a ``blocks x blocks`` grid. Image distance: the KL divergence of
  each block's histogram from the training image's same block, summed over the ``block_share``
  best-matching blocks (so a defect in a few blocks does not change which images are picked).
* :func:`window_distances`: each query location compares its feature only with the features
  inside a ``window x window`` neighbourhood of the same location in each retrieved image;
  ``1 - cosine`` to the best match. A bank location outside the window is never looked at.

Both are plain torch on tensors (no numpy, no index structures); the only Python loops run
over the ``k`` retrieved images and the ``window^2`` offsets, both bounded by settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.errors import NotFittedError


def block_matrix(n: int, blocks: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[blocks, n]``: row ``s`` averages the cells ``i`` with ``floor(i * blocks / n) == s`` (empty rows are 0)."""
    owner = (torch.arange(n) * blocks) // n
    m = (owner[None, :] == torch.arange(blocks)[:, None]).to(dtype)
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


class GlobalRetrieval(nn.Module):
    """Codebook + block histograms of the training images; picks the ``k`` nearest training images.

    Buffers (empty until fit): ``codebook`` ``[C, d]``, ``refs`` ``[N, blocks^2, C]``.
    """

    codebook: torch.Tensor
    refs: torch.Tensor

    def __init__(self, blocks: int = 5, block_share: float = 0.8) -> None:
        super().__init__()
        self.blocks = blocks
        self.block_share = block_share
        self.register_buffer("codebook", torch.empty(0))
        self.register_buffer("refs", torch.empty(0))

    def set_codebook(self, codebook: torch.Tensor) -> None:
        self.codebook = codebook.float().contiguous()

    def set_refs(self, refs: torch.Tensor) -> None:
        self.refs = refs.float().contiguous()

    def codes(self, desc: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword of every location: ``[B, d, h, w]`` -> ``[B, h, w]``."""
        if not self.codebook.numel():
            raise NotFittedError("CPR's global retrieval has no codebook: fit the detector first")
        c = self.codebook
        x = desc.permute(0, 2, 3, 1)  # [B, h, w, d]
        d2 = (x * x).sum(-1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)
        return d2.argmin(-1)

    def histograms(self, desc: torch.Tensor) -> torch.Tensor:
        """Codeword histogram of each block: ``[B, d, h, w]`` -> ``[B, blocks^2, C]`` (each row sums to 1)."""
        h, w = int(desc.shape[-2]), int(desc.shape[-1])
        onehot = F.one_hot(self.codes(desc), self.codebook.shape[0]).to(desc.dtype)  # [B, h, w, C]
        rows, cols = block_matrix(h, self.blocks).to(desc), block_matrix(w, self.blocks).to(desc)
        hist = torch.einsum("sy,byxc,tx->bstc", rows, onehot, cols)
        return hist.reshape(desc.shape[0], self.blocks * self.blocks, -1)

    def distances(self, hist: torch.Tensor, refs: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
        """``[B, N]``: KL(query block || reference block), summed over the ``block_share`` best blocks."""
        refs = self.refs if refs is None else refs
        if not refs.numel():
            raise NotFittedError("CPR's global retrieval has no training histograms: fit the detector first")
        q = hist[:, None] + eps  # [B, 1, S, C]
        r = refs[None] + eps  # [1, N, S, C]
        kl = (q * (q.log() - r.log())).sum(-1)  # [B, N, S]
        keep = max(1, int(kl.shape[-1] * self.block_share))
        return kl.sort(dim=-1).values[..., :keep].sum(-1)

    def retrieve(self, desc: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``[B, k]`` of the ``k`` most similar training images, most similar first."""
        dist = self.distances(self.histograms(desc))
        return dist.topk(min(k, dist.shape[1]), dim=1, largest=False).indices


def window_distances(
    query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, window: int, chunk: int = 1
) -> torch.Tensor:
    """``[B, h, w]``: per query location, ``1 - cosine`` to its best match in the retrieved images' windows.

    ``query``: ``[B, D, h, w]`` L2-normalised features; ``bank``: ``[N, D, h, w]`` L2-normalised
    training features (any float dtype); ``index``: ``[B, k]`` retrieved training images;
    ``window``: odd side of the neighbourhood searched around the same location (1: that location
    only). The batch runs ``chunk`` images at a time (1 keeps the working set in the CPU cache,
    about 4x faster than the whole batch at once; a chunk >= B is one batched computation).
    """
    if chunk >= query.shape[0]:
        return _window_distances(query.contiguous(), bank, index, window)
    parts = [_window_distances(q.contiguous(), bank, i, window) for q, i in zip(query.split(chunk), index.split(chunk))]
    return torch.cat(parts)


def _window_distances(query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, window: int) -> torch.Tensor:
    """Each offset compares only the locations whose partner lies inside the image (no padded copy of the
    retrieved features); the others get ``inf`` for that offset, so padding never matches."""
    b, _, h, w = query.shape
    r = window // 2
    best = torch.full((b, h, w), float("inf"), dtype=query.dtype, device=query.device)
    for j in range(int(index.shape[1])):
        ref = bank[index[:, j]].to(query.dtype)  # [b, D, h, w]
        for oy in range(-r, r + 1):
            for ox in range(-r, r + 1):
                top, bottom, left, right = max(0, -oy), max(0, oy), max(0, -ox), max(0, ox)
                q = query[:, :, top : h - bottom, left : w - right]
                sim = (q * ref[:, :, bottom : h - top, right : w - left]).sum(1)
                dist = 1.0 - sim
                if oy or ox:
                    dist = F.pad(dist, (left, right, top, bottom), value=float("inf"))
                best = torch.minimum(best, dist)
    return best
