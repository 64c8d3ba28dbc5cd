"""Patch description networks (PDN) of EfficientAD (Batzner et al., WACV 2024), and a MAC counter.

EfficientAD-S: conv 4x4x128, avgpool 2/2, conv 4x4x256, avgpool 2/2, conv 3x3x256, conv 4x4xC.
EfficientAD-M: conv 4x4x256, avgpool 2/2, conv 4x4x512, avgpool 2/2, conv 1x1x512, conv 3x3x512,
conv 4x4xC, conv 1x1xC. ReLU after every convolution but the last.

With ``padding=False`` (the authors' code) an ``S x S`` input gives ``(S - 32) / 4`` output vectors
per side (256 px -> 56) and output ``(i, j)`` sees exactly the input rows ``4i .. 4i + 32`` and
columns ``4j .. 4j + 32`` (a 33 x 33 patch). With ``padding=True`` (paddings 3, 1, 3, 1, 1 as in the
paper's table) the output has ``S / 4`` vectors per side and output ``(i, j)`` sees rows
``4i - 16 .. 4i + 16``. Either way one input pixel influences only outputs whose patch holds it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from anomnet.errors import ConfigError

RECEPTIVE_FIELD = 33
STRIDE = 4
SIZES = ("s", "m")


def pdn(size: str, out_channels: int, padding: bool = False) -> nn.Sequential:
    """The small (``"s"``) or medium (``"m"``) PDN with ``out_channels`` output channels."""
    p = 1 if padding else 0
    if size == "s":
        layers: list[nn.Module] = [
            nn.Conv2d(3, 128, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(128, 256, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 256, 3, padding=p),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        ]
    elif size == "m":
        layers = [
            nn.Conv2d(3, 256, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 512, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(512, 512, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=p),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, 4),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        ]
    else:
        raise ConfigError(f"model_size must be one of {', '.join(SIZES)}, got {size!r}")
    return nn.Sequential(*layers)


def output_size(input_size: int, padding: bool = False) -> int:
    """Output vectors per side of a PDN for an ``input_size`` side (both PDN sizes agree)."""
    if padding:
        s = input_size + 6 - 3  # conv 4 p3
        s = (s + 2 - 2) // 2 + 1  # avgpool 2/2 p1
        s = s + 6 - 3
        s = (s + 2 - 2) // 2 + 1
        return s - 3  # conv 3 p1 keeps it, conv 4 p0 takes 3
    s = (input_size - 3) // 2
    s = (s - 3) // 2
    return s - 2 - 3


def patch_offset(padding: bool = False) -> int:
    """Input row of the first row of output 0's 33 px patch (output i starts at ``4i + offset``)."""
    return -16 if padding else 0


def map_padding(input_size: int, padding: bool = False) -> tuple[int, int]:
    """Cells to add before/after an output map so that cell ``k`` covers input rows ``4k .. 4k+3``.

    Output ``i``'s patch is centred at ``4i + offset + 16``: cell ``i + (offset + 16) / 4``.
    """
    before = (patch_offset(padding) + 16) // STRIDE
    after = input_size // STRIDE - output_size(input_size, padding) - before
    return before, max(after, 0)


def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one ``input_size`` image (conv and linear layers).

    Counted with forward hooks: a convolution costs ``out_elements * in_channels/groups * kh * kw``.
    """
    total = 0

    def conv_hook(module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(module, nn.Conv2d):  # hooks are registered on Conv2d modules only
            return
        kh, kw = module.kernel_size
        total += out.numel() // out.shape[0] * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(module, nn.Linear):  # hooks are registered on Linear modules only
            return
        total += out.numel() // out.shape[0] * module.in_features

    hooks: list[Callable[[], None]] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook).remove)
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook).remove)
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size))
        model.train(was_training)
    finally:
        for remove in hooks:
            remove()
    return total
