"""ResNet-18/50 and Wide-ResNet-50-2/101-2 feature extractors, in plain PyTorch.

The module names and parameter shapes are exactly torchvision's (``conv1, bn1, relu, maxpool,
layer1..layer4`` with ``BasicBlock``/``Bottleneck`` and ``downsample.0/.1``), so a torchvision
ImageNet state dict (``resnet18-f37072fd.pth``, ``wide_resnet50_2-95faca4d.pth``, ...) loads with
strict key matching. The classifier (``avgpool``, ``fc``) is left out: ``fc.*`` keys in a file
are ignored. The weights files are not shipped; see :func:`anomnet.backbones.base.find_weights_file`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from anomnet.backbones.base import (
    BackboneInfo,
    FeatureExtractor,
    FoldableBatchNorm2d,
    FoldableConv2d,
)
from anomnet.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
RESNET_DEFAULT_LAYERS = ("layer2", "layer3")  # PatchCore / PaDiM choice
RESNET_IGNORED_PREFIXES = ("fc.",)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> FoldableConv2d:
    return FoldableConv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> FoldableConv2d:
    return FoldableConv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if base_width != 64:
            raise ConfigError("BasicBlock only supports base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = FoldableBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = FoldableBatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    def conv_bn_pairs(self) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), *_downsample_pairs(self.downsample)]


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck (stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = FoldableBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = FoldableBatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = FoldableBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    def conv_bn_pairs(self) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
        return [
            (self.conv1, self.bn1),
            (self.conv2, self.bn2),
            (self.conv3, self.bn3),
            *_downsample_pairs(self.downsample),
        ]


def _downsample_pairs(downsample: nn.Module | None) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
    if downsample is None:
        return []
    conv, bn = downsample[0], downsample[1]  # type: ignore[index]
    return [(conv, bn)]


@dataclass(frozen=True)
class ResNetConfig:
    block: type[BasicBlock] | type[Bottleneck]
    blocks_per_layer: tuple[int, int, int, int]
    width_per_group: int = 64


RESNET_CONFIGS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(BasicBlock, (2, 2, 2, 2)),
    "resnet50": ResNetConfig(Bottleneck, (3, 4, 6, 3)),
    "wide_resnet50_2": ResNetConfig(Bottleneck, (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetConfig(Bottleneck, (3, 4, 23, 3), width_per_group=128),
}

# torchvision's ImageNet weights file of each variant (IMAGENET1K_V1, the one the papers used).
TORCHVISION_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
}

_DESCRIPTIONS = {
    "resnet18": "ResNet-18 (11.7M params, torchvision layout); weights file needed",
    "resnet50": "ResNet-50 (25.6M params, torchvision layout); weights file needed",
    "wide_resnet50_2": ("Wide-ResNet-50-2 (68.9M params), the PatchCore/PaDiM paper backbone; weights file needed"),
    "wide_resnet101_2": "Wide-ResNet-101-2 (126.9M params); weights file needed",
}


def resnet_info(name: str) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        layers=RESNET_LAYERS,
        default_layers=RESNET_DEFAULT_LAYERS,
        needs_weights_file=True,
        description=(
            f"{_DESCRIPTIONS[name]} (torchvision ImageNet file {TORCHVISION_FILES[name]}); "
            "ImageNet mean/std input normalization"
        ),
    )


class ResNetExtractor(FeatureExtractor):
    """torchvision-compatible ResNet trunk returning layer1..layer4 feature maps."""

    def __init__(self, name: str, layers: Sequence[str]) -> None:
        info = resnet_info(name)
        super().__init__(info, layers, IMAGENET_MEAN, IMAGENET_STD)
        cfg = RESNET_CONFIGS[name]
        self._base_width = cfg.width_per_group
        self.inplanes = 64
        self.conv1 = FoldableConv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FoldableBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(cfg.block, 64, cfg.blocks_per_layer[0])
        self.layer2 = self._make_layer(cfg.block, 128, cfg.blocks_per_layer[1], stride=2)
        self.layer3 = self._make_layer(cfg.block, 256, cfg.blocks_per_layer[2], stride=2)
        self.layer4 = self._make_layer(cfg.block, 512, cfg.blocks_per_layer[3], stride=2)
        self._channels = {n: c * cfg.block.expansion for n, c in zip(RESNET_LAYERS, (64, 128, 256, 512))}
        self._strides = dict(zip(RESNET_LAYERS, (4, 8, 16, 32)))
        self._wanted = frozenset(self.layers)
        deepest = max(RESNET_LAYERS.index(n) for n in self.layers)
        self._run = RESNET_LAYERS[: deepest + 1]
        self._init_weights()

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                FoldableBatchNorm2d(planes * block.expansion),
            )
        mods: list[nn.Module] = [block(self.inplanes, planes, stride, downsample, self._base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            mods.append(block(self.inplanes, planes, base_width=self._base_width))
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        # torchvision's initialization; only matters for weights="random" (tests).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: dict[str, torch.Tensor] = {}
        for name in self._run:
            x = getattr(self, name)(x)
            if name in self._wanted:
                out[name] = x
        return out

    def _conv_bn_pairs(self) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
        pairs = [(self.conv1, self.bn1)]
        for name in self._run:  # only the layers the forward pass runs
            for block in getattr(self, name):
                pairs.extend(block.conv_bn_pairs())
        return pairs


def guess_resnet_family(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the torchvision ResNet-family architecture a state dict most likely belongs to."""
    w1 = state.get("layer1.0.conv1.weight")
    conv2 = state.get("layer1.0.conv2.weight")
    if w1 is None or conv2 is None or w1.ndim != 4 or conv2.ndim != 4:
        return None
    n_blocks3 = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    bottleneck = "layer1.0.conv3.weight" in state
    if not bottleneck:
        depth = {2: 18, 6: 34}.get(n_blocks3)
        return f"resnet{depth}" if depth else "a ResNet with BasicBlocks"
    depth = {6: 50, 23: 101, 36: 152}.get(n_blocks3)
    if depth is None:
        return "a ResNet with Bottleneck blocks"
    if conv2.shape[1] != conv2.shape[0]:  # grouped 3x3 convolution
        return f"a ResNeXt-{depth}"
    width = int(w1.shape[0])
    if width == 64:
        return f"resnet{depth}"
    if width == 128:
        return f"wide_resnet{depth}_2"
    return f"a ResNet-{depth} with {width} channels in layer1.0.conv1"
