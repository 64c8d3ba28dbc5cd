"""CPR's local retrieval head: a small network per backbone level, trained on the frozen levels.

Per level: 1x1 convolution to ``width`` channels, BatchNorm, ReLU; a four-branch block to
``block`` channels (1x1; 1x1 to ``width / 4`` then 3x3; 1x1; 1x1 then a 3x3 average, each to
``block / 4`` channels with BatchNorm + ReLU, concatenated); a 1x1 projection to ``dim``; L2
normalisation. The reference code's Inception-style head has ``width, block, dim = 192, 256,
384``; the defaults are narrower for the CPU (settings ``head_width``, ``head_block``,
``head_dim``; docs/cpr.md). The pooling branch convolves before it averages (the same function
as average-then-convolve, on fewer channels).

Training uses the BatchNorm form; prediction uses :meth:`RetrievalHead.fused`, the same
function with every BatchNorm folded into its convolution (plain convolutions and ReLUs).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ConvBNReLU(nn.Module):
    """Convolution (no bias), optional 3x3 average (``pool``), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False) if pool else nn.Identity()
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.pool(self.conv(x))))

    def fused(self) -> nn.Sequential:
        """The eval-mode function without BatchNorm (the average excludes padding: it commutes with the affine map)."""
        conv = fuse_conv_bn_eval(copy.deepcopy(self.conv).eval(), copy.deepcopy(self.bn).eval())
        return nn.Sequential(conv, copy.deepcopy(self.pool), nn.ReLU(inplace=True))


class FourBranch(nn.Module):
    """``width`` -> ``block`` channels (``block`` 0: ``width``): four branches of ``block / 4`` channels,
    concatenated; the 3x3 branch first reduces to ``width / 4``."""

    def __init__(self, width: int, block: int = 0) -> None:
        super().__init__()
        q, inner = (block or width) // 4, width // 4
        self.branches = nn.ModuleList(
            [
                ConvBNReLU(width, q),
                nn.Sequential(ConvBNReLU(width, inner), ConvBNReLU(inner, q, 3)),
                ConvBNReLU(width, q),
                ConvBNReLU(width, q, pool=True),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class LevelHead(nn.Module):
    def __init__(self, cin: int, width: int, dim: int, block: int = 0) -> None:
        super().__init__()
        self.inp = ConvBNReLU(cin, width)
        self.block = FourBranch(width, block)
        self.out = nn.Conv2d(block or width, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.inp(x.contiguous(memory_format=torch.channels_last))))


def _fuse(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every :class:`ConvBNReLU` replaced by its fused form."""
    if isinstance(module, ConvBNReLU):
        return module.fused()
    if not module._modules:
        return copy.deepcopy(module)
    out = copy.copy(module)
    out._modules = {name: _fuse(child) for name, child in module._modules.items() if child is not None}
    return out


class RetrievalHead(nn.Module):
    """Backbone levels ``[B, C_l, h_l, w_l]`` -> L2-normalised retrieval features ``[B, dim, h_l, w_l]`` per level."""

    def __init__(self, channels: Sequence[int], width: int = 96, dim: int = 128, block: int = 0) -> None:
        super().__init__()
        self.levels = nn.ModuleList(LevelHead(c, width, dim, block) for c in channels)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(levels) != len(self.levels):
            raise ValueError(f"the head has {len(self.levels)} levels, got {len(levels)} feature maps")
        out = [nn.functional.normalize(head(x), dim=1, eps=1e-8) for head, x in zip(self.levels, levels)]
        return [f.contiguous() for f in out]  # plain NCHW (the convolutions ran channels-last)

    def fused(self) -> RetrievalHead:
        """The same function in eval mode with the BatchNorms folded into the convolutions (for prediction)."""
        was_training = self.training
        self.eval()
        try:
            fused = _fuse(self)
        finally:
            self.train(was_training)
        fused.eval()
        for p in fused.parameters():
            p.requires_grad_(False)
        return fused  # type: ignore[return-value]
