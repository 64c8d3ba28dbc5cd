"""Nearest-neighbour search over a memory bank.

Backends (all return Euclidean, not squared, distances sorted ascending, with indices):

- ``ivf``: faiss inverted-file index (``IndexIVFFlat``): the bank is split into ``lists`` k-means
  cells and a query scans the ``probe`` nearest cells. About 5x faster than exact search on
  PatchCore banks with top-1 agreement above 99.9 % (docs/design.md). Its cell centroids are
  part of the model, so a loaded model searches exactly the same cells.
- ``faiss``: faiss exact search (``IndexFlatL2``).
- ``exact``: plain torch, no dependency (the fallback).
- ``auto``: ``ivf`` for banks of at least ``IVF_MIN_BANK`` vectors, else ``faiss``; ``exact``
  when faiss is not installed.

In graph mode (:mod:`anomnet.components.graph_mode`: while a model is traced for export, and for
the eager reference it is tested against) every backend searches exactly: the nearest neighbour with
:func:`graph_nearest` (one product with the bank per block and an argmin, a running minimum over the
blocks, the distance computed directly), ``k`` of them with :func:`graph_search`, and the neighbours of
bank vectors (ToCoAD's eq. 9 support) from a table computed once (:meth:`NearestNeighbors.bank_neighbors`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from anomnet.components.graph_mode import graph_mode_active
from anomnet.errors import ConfigError
from anomnet.install import pip_command

BACKENDS = ("auto", "ivf", "faiss", "exact")
IVF_MIN_BANK = 10_000
GRAPH_BANK_CHUNK = 4096
"""Bank vectors per distance block of :func:`graph_nearest` and :func:`graph_search` (``[queries, 4096]`` at a time)."""
TABLE_QUERY_CHUNK = 2048
"""Bank rows searched at a time while :meth:`NearestNeighbors.bank_neighbors` builds its table."""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def default_lists(bank_size: int) -> int:
    """Number of IVF cells: about the square root of the bank size."""
    return int(min(4096, max(16, round(math.sqrt(bank_size)))))


class NearestNeighbors:
    """k-nearest-neighbour search in a fixed bank of vectors ``[M, D]``."""

    def __init__(
        self,
        bank: torch.Tensor,
        backend: str = "auto",
        probe: int = 8,
        centroids: torch.Tensor | None = None,
        chunk: int = 4096,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"nn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ConfigError(f"memory bank must be a non-empty [M, D] matrix, got {tuple(bank.shape)}")
        if probe < 1:
            raise ConfigError(f"nn_probe must be at least 1, got {probe}")
        if backend == "auto":
            backend = (
                "exact"
                if not faiss_available()
                else ("ivf" if bank.shape[0] >= IVF_MIN_BANK or centroids is not None else "faiss")
            )
        if backend in ("faiss", "ivf") and not faiss_available():
            raise ConfigError(f"nn_backend {backend!r} needs the faiss-cpu package ({pip_command('faiss-cpu')})")
        self.backend = backend
        self.probe = probe
        self.bank = bank.detach().float().contiguous()
        self.chunk = chunk
        self.centroids: torch.Tensor | None = None
        self._index: Any = None
        self._bank_table: torch.Tensor | None = None  # [M, k] nearest bank rows of each bank row (graph mode)
        if backend == "ivf":
            self._build_ivf(probe, centroids)
        elif backend == "faiss":
            import faiss

            self._index = faiss.IndexFlatL2(self.bank.shape[1])
            self._index.add(self.bank.numpy())
        else:
            self._bank_sq = (self.bank * self.bank).sum(1)

    def _build_ivf(self, probe: int, centroids: torch.Tensor | None) -> None:
        import faiss

        d = self.bank.shape[1]
        if centroids is None:
            km = faiss.Kmeans(d, default_lists(len(self)), niter=20, seed=1234, verbose=False)
            km.train(self.bank.numpy())
            centroids = torch.from_numpy(np.ascontiguousarray(km.centroids))
        if centroids.ndim != 2 or centroids.shape[1] != d:
            raise ConfigError(f"IVF centroids must be [L, {d}], got {tuple(centroids.shape)}")
        self.centroids = centroids.float().contiguous()
        self._quantizer = faiss.IndexFlatL2(d)  # kept referenced: the index does not own it
        self._quantizer.add(self.centroids.numpy())
        index = faiss.IndexIVFFlat(self._quantizer, d, self.centroids.shape[0])
        index.is_trained = True
        index.add(self.bank.numpy())
        index.nprobe = min(probe, self.centroids.shape[0])
        self._index = index

    def __len__(self) -> int:
        return self.bank.shape[0]

    def subset(self, keep: torch.Tensor) -> NearestNeighbors:
        """The same search over the bank rows where ``keep`` (bool ``[M]``) is true.

        An IVF index keeps its cells (the same centroids and ``probe``), so the subset is searched the
        way the whole bank is, only without the rows left out; the other backends search exactly.
        Indices returned by the subset's :meth:`search` refer to ``bank[keep]``.
        """
        if keep.shape != (len(self),):
            raise ConfigError(f"subset mask must be [{len(self)}], got {tuple(keep.shape)}")
        if not bool(keep.any()):
            raise ConfigError("a subset of the memory bank needs at least one vector")
        return NearestNeighbors(self.bank[keep], self.backend, self.probe, self.centroids, self.chunk)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances ``[N, k]`` and indices ``[N, k]`` (int64) of the ``k`` nearest bank vectors."""
        queries = queries.detach().float().contiguous()
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ConfigError(f"queries must be [N, {self.bank.shape[1]}], got {tuple(queries.shape)}")
        k = min(k, len(self))
        if graph_mode_active():
            if k == 1:
                return graph_nearest(queries, self.bank, self._augmented())
            return graph_search(queries, self.bank, k, self._norms())
        if self._index is not None:
            d2, idx = self._index.search(queries.numpy(), k)
            idx_t = torch.from_numpy(idx).long()
            if bool((idx_t < 0).any()):  # an IVF probe found fewer than k vectors: fill from exact search
                return self._exact(queries, k)
            return torch.from_numpy(d2).clamp_min_(0).sqrt_(), idx_t
        return self._exact(queries, k)

    def bank_neighbors(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``[N, k]`` of the ``k`` nearest bank vectors of the bank vectors ``rows`` (int64 ``[N]``).

        The same neighbours as ``search(bank[rows], k)`` (the vector itself first, at distance 0). In
        graph mode they are read from a table of every bank vector's neighbours, searched exactly once
        (:func:`graph_search`) and then a constant of the traced graph, so a graph that needs them for
        every patch (ToCoAD's eq. 9) does a lookup instead of a second search of the bank.
        """
        k = min(k, len(self))
        if not graph_mode_active():
            return self.search(self.bank[rows], k)[1]
        table = self._bank_table
        if table is None or table.shape[1] < k:
            with torch.inference_mode():
                parts = [
                    graph_search(self.bank[start : start + TABLE_QUERY_CHUNK], self.bank, k, self._norms())[1]
                    for start in range(0, len(self), TABLE_QUERY_CHUNK)
                ]
            table = self._bank_table = torch.cat(parts)
        return table[rows][:, :k] if table.shape[1] > k else table[rows]

    def _norms(self) -> torch.Tensor:
        """Squared norms ``[M]`` of the bank vectors (computed once)."""
        if not hasattr(self, "_bank_sq"):
            self._bank_sq = (self.bank * self.bank).sum(1)
        return self._bank_sq

    def _augmented(self) -> torch.Tensor:
        """``[D + 1, M]``: the columns ``(-2 b, |b|^2)`` of :func:`graph_nearest`'s one product (computed once)."""
        if not hasattr(self, "_bank_aug"):
            self._bank_aug = torch.cat([-2.0 * self.bank, self._norms()[:, None]], 1).T.contiguous()
        return self._bank_aug

    def _exact(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._norms()
        dists, idxs = [], []
        for start in range(0, queries.shape[0], self.chunk):
            q = queries[start : start + self.chunk]
            d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ self.bank.T + self._bank_sq[None]
            d, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)
            dists.append(d.clamp_min_(0).sqrt_())
            idxs.append(i)
        return torch.cat(dists), torch.cat(idxs)


def graph_nearest(
    queries: torch.Tensor, bank: torch.Tensor, augmented: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest bank vector of every query: distances ``[N, 1]`` and indices ``[N, 1]`` (int64).

    ``augmented`` is ``[D + 1, M]``, the columns ``(-2 b, |b|^2)``: the query with a 1 appended times
    it is ``|b|^2 - 2 q.b``, the squared distance less the query's own ``|q|^2`` (which changes no
    argmin), in one product with no pass to add ``|b|^2``. The bank is scanned in blocks of
    :data:`GRAPH_BANK_CHUNK` columns: per block that product and its minimum (a top-1: one pass that
    gives value and index; OpenVINO's ArgMin took four times as long), and a running minimum over the
    blocks, so memory is ``[queries, block]``.
    The returned distance is computed directly from the chosen vector (``|q - b|``), free of the
    expansion's cancellation. No loop depends on the number of queries, so a traced graph takes any batch.
    """
    extended = torch.cat([queries, torch.ones_like(queries[:, :1])], 1)
    best_d2: torch.Tensor | None = None
    best_i = torch.zeros(queries.shape[0], 1, dtype=torch.long)
    for start in range(0, augmented.shape[1], GRAPH_BANK_CHUNK):
        low, at = torch.topk(extended @ augmented[:, start : start + GRAPH_BANK_CHUNK], 1, dim=1, largest=False)
        if best_d2 is None:
            best_d2, best_i = low, at
        else:  # strictly nearer: on a tie the lower index stays, as in one scan of the whole bank
            nearer = low < best_d2
            best_d2 = torch.where(nearer, low, best_d2)
            best_i = torch.where(nearer, at + start, best_i)
    dist = torch.linalg.vector_norm(queries - bank[best_i[:, 0]], dim=1, keepdim=True)
    return dist, best_i


def graph_search(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-nearest-neighbour search with no loop over the queries (so a traced graph takes any batch).

    The bank, whose size is fixed, is scanned in blocks of :data:`GRAPH_BANK_CHUNK` vectors; each
    block keeps its ``k`` best, and the best ``k`` of those are returned: the same neighbours as a
    search of the whole bank at once, with memory ``[queries, block]``. The distances are computed
    directly from the chosen vectors (``[queries, k, D]``: meant for few queries; the neighbours of
    bank vectors come from :meth:`NearestNeighbors.bank_neighbors`).
    """
    bank_sq = (bank * bank).sum(1) if bank_sq is None else bank_sq
    dists, idxs = [], []
    for start in range(0, bank.shape[0], GRAPH_BANK_CHUNK):
        block = bank[start : start + GRAPH_BANK_CHUNK]
        d2 = torch.addmm(bank_sq[start : start + GRAPH_BANK_CHUNK][None], queries, block.T, alpha=-2.0)
        d, i = torch.topk(d2, min(k, block.shape[0]), dim=1, largest=False, sorted=True)
        dists.append(d)
        idxs.append(i + start)
    d2, i = (dists[0], idxs[0]) if len(dists) == 1 else (torch.cat(dists, 1), torch.cat(idxs, 1))
    if len(dists) > 1:
        d2, pick = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        i = torch.gather(i, 1, pick)
    return torch.linalg.vector_norm(queries[:, None, :] - bank[i], dim=-1), i
