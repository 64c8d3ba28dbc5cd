"""Greedy k-center coreset and nearest-neighbour search."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomnet.components import nn_search
from anomnet.components.coreset import greedy_coreset, random_projection
from anomnet.components.graph_mode import graph_mode
from anomnet.components.nn_search import NearestNeighbors, faiss_available
from anomnet.errors import ConfigError


def _radius(x: torch.Tensor, centers: torch.Tensor) -> float:
    """Covering radius: the largest distance from a point to its nearest center."""
    return float(torch.cdist(x, x[centers]).min(1).values.max())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 11), k=st.integers(1, 4), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_greedy_is_a_2_approximation_of_optimal_k_center(n: int, k: int, d: int, seed: int) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    k = min(k, n - 1)
    chosen = greedy_coreset(x, k, projection_dim=0, seed=seed)
    assert len(set(chosen.tolist())) == k
    optimum = min(_radius(x, torch.tensor(c)) for c in itertools.combinations(range(n), k))
    assert _radius(x, chosen) <= 2 * optimum + 1e-5


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 40), k=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_each_new_center_is_the_farthest_point(n: int, k: int, seed: int) -> None:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    k = min(k, n - 1)
    chosen = greedy_coreset(x, k, projection_dim=0, seed=seed)
    for i in range(1, k):
        d = torch.cdist(x, x[chosen[:i]]).min(1).values
        assert d[chosen[i]] >= d.max() - 1e-4


def test_coreset_edge_cases() -> None:
    x = torch.randn(5, 3)
    assert greedy_coreset(x, 10).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        greedy_coreset(x, 0)
    a = greedy_coreset(torch.randn(200, 16, generator=torch.Generator().manual_seed(1)), 20, projection_dim=8, seed=3)
    b = greedy_coreset(torch.randn(200, 16, generator=torch.Generator().manual_seed(1)), 20, projection_dim=8, seed=3)
    assert torch.equal(a, b), "coreset must be deterministic for a seed"


def test_random_projection_roughly_preserves_distances() -> None:
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    y = random_projection(x, 128, seed=0)
    assert y.shape == (300, 128)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert 0.8 < float(ratio.median()) < 1.2
    assert random_projection(x, 512) is x


def _nn_reference(bank: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(q.double(), bank.double())
    v, i = torch.topk(d, k, largest=False)
    return v.float(), i


@pytest.mark.parametrize(
    "backend",
    ["exact", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed"))],
)
def test_search_matches_brute_force(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(2000, 40, generator=g), torch.randn(300, 40, generator=g)
    nn = NearestNeighbors(bank, backend, chunk=64)
    d, i = nn.search(q, 5)
    rd, ri = _nn_reference(bank, q, 5)
    assert torch.allclose(d, rd, atol=1e-4)
    assert (i == ri).float().mean() > 0.99  # ties at float precision may swap order


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_ivf_index_agrees_with_exact_search() -> None:
    """Clustered data like patch features: the IVF index finds the exact nearest neighbour almost always."""
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(50, 64, generator=g) * 3
    bank = centers[torch.randint(50, (12000,), generator=g)] + torch.randn(12000, 64, generator=g)
    q = centers[torch.randint(50, (2000,), generator=g)] + torch.randn(2000, 64, generator=g)
    exact = NearestNeighbors(bank, "exact")
    ivf = NearestNeighbors(bank, "ivf", probe=8)
    assert ivf.backend == "ivf" and ivf.centroids is not None
    assert NearestNeighbors(bank, "auto").backend == "ivf"
    de, ie = exact.search(q, 1)
    di, ii = ivf.search(q, 1)
    assert (ie == ii).float().mean() > 0.99
    assert bool((di >= de - 1e-3).all())  # an approximate neighbour is never closer than the true one
    assert float((di / de).max()) < 1.2
    # rebuilt from its saved cell centroids, the index gives identical results
    again = NearestNeighbors(bank, "ivf", probe=8, centroids=ivf.centroids)
    d2, i2 = again.search(q, 3)
    d3, i3 = ivf.search(q, 3)
    assert torch.equal(i2, i3) and torch.equal(d2, d3)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_exact_and_faiss_backends_agree() -> None:
    g = torch.Generator().manual_seed(1)
    bank, q = torch.randn(5000, 152, generator=g), torch.randn(1024, 152, generator=g)
    de, ie = NearestNeighbors(bank, "exact").search(q, 1)
    df, if_ = NearestNeighbors(bank, "faiss").search(q, 1)
    assert torch.allclose(de, df, atol=1e-3)
    assert (ie == if_).float().mean() > 0.999


def test_search_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError):
        NearestNeighbors(torch.empty(0, 3))
    with pytest.raises(ConfigError):
        NearestNeighbors(torch.randn(4, 3), backend="annoy")
    with pytest.raises(ConfigError):
        NearestNeighbors(torch.randn(4, 3), probe=0)
    with pytest.raises(ConfigError):
        NearestNeighbors(torch.randn(4, 3), "exact").search(torch.randn(2, 5))


# -- graph mode: the exact search an exported graph carries ---------------------------------------


def _graph_bank() -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered vectors like patch features, a bank not a multiple of the block, with duplicates across blocks."""
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(20, 24, generator=g) * 3
    bank = centers[torch.randint(20, (700,), generator=g)] + torch.randn(700, 24, generator=g)
    bank[650:660] = bank[10:20]  # exact ties in different blocks
    q = torch.cat([centers[torch.randint(20, (290,), generator=g)] + torch.randn(290, 24, generator=g), bank[645:655]])
    return bank, q


@pytest.mark.parametrize("chunk", [64, 4096])
def test_graph_nearest_is_exact(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks with a running minimum: a true nearest neighbour (ties allowed) and its distance to 1e-4 relative."""
    monkeypatch.setattr(nn_search, "GRAPH_BANK_CHUNK", chunk)
    bank, q = _graph_bank()
    nn = NearestNeighbors(bank, "exact")
    with graph_mode():
        d, i = nn.search(q, 1)
    assert d.shape == i.shape == (len(q), 1) and i.dtype == torch.long
    exact = torch.cdist(q.double(), bank.double())
    best = exact.min(1).values
    assert torch.allclose(d[:, 0].double(), best, rtol=1e-4, atol=1e-6)
    assert torch.allclose(exact.gather(1, i)[:, 0], best, rtol=1e-5, atol=1e-6)  # the index is a nearest one
    assert torch.equal(i[-10:-5, 0], torch.arange(645, 650)) and bool((d[-10:] == 0).all())
    assert torch.equal(i[-5:, 0], torch.arange(10, 15))  # a tie keeps the lower index, in any block


def test_graph_knn_and_bank_neighbours_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nn_search, "GRAPH_BANK_CHUNK", 128)
    monkeypatch.setattr(nn_search, "TABLE_QUERY_CHUNK", 100)
    bank, q = _graph_bank()
    nn = NearestNeighbors(bank, "exact")
    with graph_mode():
        d, i = nn.search(q, 5)
        rows = torch.tensor([3, 0, 699, 3, 655])
        table = nn.bank_neighbors(rows, 4)
        assert nn._bank_table is not None and nn._bank_table.shape == (700, 4)  # searched once, for every bank row
        again = nn.bank_neighbors(rows, 2)
    rd, _ = _nn_reference(bank, q, 5)
    assert torch.allclose(d, rd, rtol=1e-4, atol=1e-4)
    exact = torch.cdist(bank[rows].double(), bank.double())
    assert torch.allclose(exact.gather(1, table), exact.topk(4, largest=False).values, atol=1e-5)
    assert torch.equal(table[[0, 1, 2]][:, 0], rows[[0, 1, 2]]) and torch.equal(again, table[:, :2])
    assert torch.equal(nn.bank_neighbors(rows, 4), nn.search(bank[rows], 4)[1])  # eager: the search itself


def test_graph_nearest_traced_once_takes_any_batch() -> None:
    bank, q = _graph_bank()
    nn = NearestNeighbors(bank, "exact")

    class Search(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return nn.search(x, 1)

    traced = torch.jit.trace(Search(), (q[:1],), check_trace=False)
    with graph_mode():
        d, i = nn.search(q, 1)
    td, ti = traced(q)
    assert torch.equal(ti, i) and torch.allclose(td, d, rtol=1e-6)
