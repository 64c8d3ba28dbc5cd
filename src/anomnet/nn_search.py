"""Nearest-neighbour search over a memory bank: faiss when installed, exact torch otherwise.

Both backends return Euclidean (not squared) distances, sorted ascending, with their indices.
"""

from __future__ import annotations

import torch

from anomnet.errors import ConfigError

BACKENDS = ("auto", "faiss", "exact")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NearestNeighbors:
    """Exact k-nearest-neighbour search in a fixed bank of vectors ``[M, D]``."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto", chunk: int = 4096) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"nn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ConfigError(f"memory bank must be a non-empty [M, D] matrix, got {tuple(bank.shape)}")
        if backend == "auto":
            backend = "faiss" if faiss_available() else "exact"
        if backend == "faiss" and not faiss_available():
            raise ConfigError("nn_backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)")
        self.backend = backend
        self.bank = bank.detach().float().contiguous()
        self.chunk = chunk
        self._index = None
        if backend == "faiss":
            import faiss

            self._index = faiss.IndexFlatL2(self.bank.shape[1])
            self._index.add(self.bank.numpy())
        else:
            self._bank_sq = (self.bank * self.bank).sum(1)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances ``[N, k]`` and indices ``[N, k]`` (int64) of the ``k`` nearest bank vectors."""
        queries = queries.detach().float().contiguous()
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ConfigError(f"queries must be [N, {self.bank.shape[1]}], got {tuple(queries.shape)}")
        k = min(k, len(self))
        if self._index is not None:
            d2, idx = self._index.search(queries.numpy(), k)
            return torch.from_numpy(d2).clamp_min_(0).sqrt_(), torch.from_numpy(idx).long()
        dists, idxs = [], []
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk]
            d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ self.bank.T + self._bank_sq[None]
            d, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)
            dists.append(d.clamp_min_(0).sqrt_())
            idxs.append(i)
        return torch.cat(dists), torch.cat(idxs)
