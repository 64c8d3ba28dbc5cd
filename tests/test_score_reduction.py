"""The image-score reductions every detector shares (anomnet.components.score_reduction)."""

from __future__ import annotations

import pytest
import torch

from anomnet.components import NearestNeighbors
from anomnet.components.score_reduction import max_score, reweighted_max, top_share_mean
from anomnet.detectors import create_detector


def test_max_and_top_share_mean() -> None:
    maps = torch.arange(16.0).reshape(1, 4, 4)
    assert max_score(maps).item() == 15.0
    assert top_share_mean(maps, 0.0).item() == 15.0  # 0: the maximum
    assert top_share_mean(maps, 0.25).item() == pytest.approx((15 + 14 + 13 + 12) / 4)
    assert top_share_mean(maps, 0.3).item() == pytest.approx((15 + 14 + 13 + 12) / 4)  # 4.8 pixels: 4, rounded down
    assert top_share_mean(maps, 0.01).item() == 15.0  # at least one pixel
    assert top_share_mean(torch.stack([maps[0], -maps[0]]), 0.125).tolist() == [14.5, -0.5]  # per image


def test_reweighted_max_is_eq7() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(20, 4, generator=gen)
    feats = torch.randn(2, 6, 4, generator=gen)
    search = NearestNeighbors(bank, "exact")
    dist, idx = search.search(feats.reshape(-1, 4), 1)
    patch_scores, nearest = dist[:, 0].reshape(2, 6), idx[:, 0].reshape(2, 6)
    got = reweighted_max(feats, patch_scores, nearest, bank, search, 3)
    for b in range(2):
        best = int(patch_scores[b].argmax())
        m_star = bank[nearest[b, best]]
        support = (bank - m_star).norm(dim=1).argsort()[:3]  # m* and its two nearest bank neighbours
        weight = 1.0 - torch.softmax((feats[b, best] - bank[support]).norm(dim=1), 0)[0]
        assert got[b].item() == pytest.approx(float(weight * patch_scores[b, best]), rel=1e-5)
    assert torch.equal(reweighted_max(feats, patch_scores, nearest, bank, search, 1), patch_scores.amax(1))


def test_top_share_is_one_setting_name() -> None:
    assert create_detector("cpr", {"top_share": 0.05}).config.top_share == 0.05  # type: ignore[attr-defined]
    inp = create_detector("inpformer", {"top_ratio": 0.05})  # INP-Former's old name still reads
    assert inp.config.top_share == 0.05  # type: ignore[attr-defined]
    assert "top_share" in inp.config.to_dict() and "top_ratio" not in inp.config.to_dict()
