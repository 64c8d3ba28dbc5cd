"""EfficientAD's autoencoder: strided convolutions down to a 64-dim bottleneck, bilinear upsampling back.

Encoder: five 4x4 stride-2 convolutions (32, 32, 64, 64, 64 channels) and one convolution that
covers the remaining ``S/32`` square, giving a ``1 x 1 x 64`` code for an ``S x S`` image.
Decoder: six (bilinear upsample, 4x4 conv, ReLU, dropout 0.2) blocks, then an upsample to the
PDN's output grid and two 3x3 convolutions to ``out_channels``. The upsampling sizes are the
paper's (3, 8, 15, 32, 63, 127 at 256 px) scaled with the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.errors import ConfigError

BOTTLENECK = 64
_DECODER_SIZES_256 = (3, 8, 15, 32, 63, 127)


class Autoencoder(nn.Module):
    def __init__(self, input_size: int, output_size: int, out_channels: int = 384, dropout: float = 0.2) -> None:
        super().__init__()
        if input_size % 32 or input_size < 64:
            raise ConfigError(
                "the EfficientAD autoencoder needs an input size that is a multiple of 32 (64 or more), "
                f"got {input_size}"
            )
        self.output_size = output_size
        self.sizes = tuple(max(2, round(s * input_size / 256)) for s in _DECODER_SIZES_256)
        enc: list[nn.Module] = []
        chans = (3, 32, 32, 64, 64, 64)
        for cin, cout in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(64, BOTTLENECK, input_size // 32))
        self.encoder = nn.Sequential(*enc)
        self.decoder_convs = nn.ModuleList(
            nn.Conv2d(BOTTLENECK if i == 0 else 64, 64, 4, padding=2) for i in range(len(self.sizes))
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for size, conv in zip(self.sizes, self.decoder_convs):
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            z = self.dropout(F.relu(conv(z)))
        z = F.interpolate(z, size=self.output_size, mode="bilinear", align_corners=False)
        return self.head(z)
