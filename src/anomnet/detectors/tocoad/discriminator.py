"""ToCoAD's discriminative network: a decoder symmetric to the backbone predicting a 2-channel mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Discriminator(nn.Module):
    """U-Net-like decoder over the backbone's levels (given shallow to deep).

    The deepest level is compressed to ``widths[0]`` channels; at each shallower level the
    running map is upsampled to that level's size, concatenated with it and compressed again
    (3x3 conv, BatchNorm, ReLU) to the next, smaller width. A 1x1 convolution gives 2 logits
    (normal, anomalous), bilinearly upsampled to the input resolution.
    """

    def __init__(self, channels: Sequence[int], widths: Sequence[int] | None = None) -> None:
        super().__init__()
        chans = list(channels)[::-1]  # deep to shallow
        if widths is None:
            widths = [max(32, min(128, c)) for c in chans]
        widths = list(widths)
        if len(widths) != len(chans):
            raise ValueError(f"need one width per level ({len(chans)}), got {len(widths)}")
        self.entry = _block(chans[0], widths[0])
        self.fuse = nn.ModuleList(_block(widths[i - 1] + chans[i], widths[i]) for i in range(1, len(chans)))
        self.head = nn.Conv2d(widths[-1], 2, 1)

    def forward(self, levels: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``levels`` shallow to deep -> logits ``[B, 2, *size]``."""
        feats = list(levels)[::-1]
        x = self.entry(feats[0])
        for block, f in zip(self.fuse, feats[1:]):
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, f], dim=1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)
