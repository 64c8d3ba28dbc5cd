"""The border treatment of the patch average, pinned on real data and on a constant map.

Averaging border patches over their inside neighbours only (``count_include_pad=False``) gave
them statistics no interior patch has; an unseen good image's border then set its maximum score
and PatchCore's image AUROC on PIPED PA_FVN01_TL fell from 99.6 to 77.1. Bottle did not show it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomnet import api
from anomnet.components.features import PatchFeatures
from anomnet.data import load_dataset


class _Constant(nn.Module):
    """Stands in for a backbone: one level of ones at stride 1, so each patch average shows how many
    cells it counted."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [torch.ones(images.shape[0], 1, images.shape[-2], images.shape[-1])]

    def strides(self) -> list[int]:
        return [1]

    def channels(self) -> list[int]:
        return [1]


def test_zero_padding_counts_in_the_border_average() -> None:
    patches = PatchFeatures(_Constant(), patch_size=3)  # type: ignore[arg-type]
    feats = patches(torch.zeros(1, 3, 5, 5))[0, 0]
    assert feats[2, 2] == pytest.approx(1.0)
    assert feats[0, 2] == pytest.approx(6 / 9)  # edge: 6 of 9 cells inside
    assert feats[0, 0] == pytest.approx(4 / 9)  # corner: 4 of 9


@pytest.mark.slow
@pytest.mark.parametrize("model", ["patchcore", "anomnet"])
def test_piped_image_auroc_holds_with_the_border_fix(piped, tmp_path, model) -> None:
    # 99.6 (PatchCore) and 100 (AnomNet) at the defaults; about 77 when the border effect returns
    split = load_dataset(piped / "PA_FVN01_TL")
    det = api.fit(model, split, tmp_path / "m", progress=False)
    assert api.test(det, split, progress=False).metrics["image_auroc"] >= 0.95
