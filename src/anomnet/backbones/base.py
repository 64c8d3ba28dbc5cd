"""Shared pieces of the backbone registry: the info record, the extractor base class, weights files.

Weights files are only ever read with ``torch.load(..., weights_only=True)`` or safetensors, so a
file cannot run code when it is loaded. Every problem with a file is reported as a
:class:`~anomnet.errors.BackboneWeightsError` whose message names the file and the offending keys.
"""

from __future__ import annotations

import os
import pickle
import warnings
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.errors import BackboneWeightsError, ConfigError, NotFittedError

WEIGHTS_DIR_ENV = "ANOMNET_WEIGHTS_DIR"
"""Environment variable naming the folder searched for backbone weights files."""

MAX_LISTED_KEYS = 10
"""How many offending keys an error message lists before it says "... and N more"."""


@dataclass(frozen=True)
class BackboneInfo:
    """What the registry knows about one backbone without building it."""

    name: str  # e.g. "efficientnet_lite0"
    layers: tuple[str, ...]  # all selectable layer names, shallow to deep
    default_layers: tuple[str, ...]
    needs_weights_file: bool  # True where the user must supply the pretrained weights file
    description: str


class FoldableConv2d(nn.Conv2d):
    """``nn.Conv2d`` that can run with BatchNorm-folded weights kept outside its state dict.

    Same parameters and state-dict keys as ``nn.Conv2d``. ``FeatureExtractor`` sets
    ``_folded`` to ``(weight, bias)`` while folding is active, ``None`` otherwise.
    """

    _folded: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folded is not None:
            return self._conv_forward(x, *self._folded)
        return self._conv_forward(x, self.weight, self.bias)


class DynamicSameConv2d(FoldableConv2d):
    """TensorFlow "SAME" padding computed from each input's size (as efficientnet_lite_pytorch's
    ``Conv2dDynamicSamePadding``): output size ceil(input / stride), extra padding at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = int(x.shape[-2]), int(x.shape[-1])  # constants in a traced graph (its input size is fixed)
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        oh, ow = -(-ih // sh), -(-iw // sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


class FoldableBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that passes its input through while folded into the convolution before."""

    _bypassed: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bypassed:
            return x
        return super().forward(x)


def _fold_key(conv: FoldableConv2d, bn: FoldableBatchNorm2d) -> tuple[object, ...] | None:
    """Identity of the tensors the folding reads, or None if any of them requires grad.

    (version, storage address) of each: any in-place change (load_state_dict, optimizer step,
    running statistics) bumps a version; ``.to()`` or assigning new tensors changes the
    address. Reads the module dicts directly and is unrolled: it runs for every pair on every
    forward pass (about 2 us per pair).
    """
    cw = conv._parameters["weight"]
    cb = conv._parameters.get("bias")
    bw = bn._parameters["weight"]
    bb = bn._parameters["bias"]
    rm = bn._buffers["running_mean"]
    rv = bn._buffers["running_var"]
    if cw is None or bw is None or bb is None or rm is None or rv is None:
        return None  # nothing to fold from
    if cw.requires_grad or bw.requires_grad or bb.requires_grad or (cb is not None and cb.requires_grad):
        return None
    return (
        cw._version, cw.data_ptr(),
        None if cb is None else (cb._version, cb.data_ptr()),
        bw._version, bw.data_ptr(),
        bb._version, bb.data_ptr(),
        rm._version, rm.data_ptr(),
        rv._version, rv.data_ptr(),
    )  # fmt: skip


def _fold(conv: FoldableConv2d, bn: FoldableBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable anywhere
        if bn.running_var is None or bn.running_mean is None:
            raise ConfigError("BatchNorm folding needs running statistics")
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        shift = conv.bias - bn.running_mean if conv.bias is not None else -bn.running_mean
        bias = shift * scale + bn.bias
    return weight, bias


class FeatureExtractor(nn.Module):
    """A frozen pretrained trunk that returns the feature maps of some of its layers.

    Subclasses register the trunk's modules directly on themselves, so that ``state_dict()``
    has the key names of the original weights files (torchvision format for ResNets, the
    ``efficientnet_lite_pytorch`` format for EfficientNet-Lite), whatever the speed options.
    The input normalization constants are non-persistent buffers, not in ``state_dict()``.

    Speed options (both on by default through ``create_backbone``; outputs equal to ~1e-5):

    * ``fuse_batchnorm``: in ``eval()`` mode, every (convolution, BatchNorm) pair whose
      parameters are all frozen runs as one convolution with folded weights. The folded
      weights are a cache derived from the parameters (rebuilt when a parameter or running
      statistic changes, e.g. by ``load_state_dict``, an optimizer step or ``.to()``), so the
      state dict, training mode and fine-tuning (re-enabled gradients) are unaffected.
    * ``channels_last``: the input is converted to NHWC memory layout, which makes oneDNN
      run every convolution in NHWC; returned feature maps are ordinary contiguous NCHW.
    """

    name: str
    layers: tuple[str, ...]
    ready: bool = True
    input_scale: torch.Tensor
    input_shift: torch.Tensor
    """False while a file-backed backbone waits for its weights (see ``anomnet.backbones.build_backbone``)."""

    def __init__(
        self,
        info: BackboneInfo,
        layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.info = info
        self.name = info.name
        self.layers = tuple(layers)
        # x_normalized = (x - mean) / std, written as x * scale + shift.
        # An explicit device keeps these real tensors when the trunk is built on "meta".
        mean_t = torch.tensor(mean, dtype=torch.float32, device="cpu").view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device="cpu").view(1, 3, 1, 1)
        self.register_buffer("input_scale", 1.0 / std_t, persistent=False)
        self.register_buffer("input_shift", -mean_t / std_t, persistent=False)
        self.fuse_batchnorm = False
        self.channels_last = False
        self._pairs_cache: list[tuple[FoldableConv2d, FoldableBatchNorm2d]] | None = None

    # -- to be provided by subclasses -------------------------------------------------------
    # set in the subclass's __init__: output channels and output stride (input pixels per
    # feature pixel) of every selectable layer
    _channels: dict[str, int]
    _strides: dict[str, int]

    @abstractmethod
    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the trunk on normalized input up to the deepest selected layer.

        Returns at least every selected layer's output, keyed by layer name.
        """

    @abstractmethod
    def _conv_bn_pairs(self) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
        """Every (convolution, BatchNorm after it) pair the forward pass runs."""

    # -- BatchNorm folding --------------------------------------------------------------------
    def _sync_folding(self) -> None:
        if self._pairs_cache is None:
            self._pairs_cache = self._conv_bn_pairs()
        use = self.fuse_batchnorm and not self.training
        for conv, bn in self._pairs_cache:
            key = _fold_key(conv, bn) if use else None
            if key is None:  # folding off, training mode, or a parameter being trained
                conv._folded = None
                bn._bypassed = False
                continue
            if conv._folded is None or conv.__dict__.get("_fold_key") != key:
                conv._folded = _fold(conv, bn)
                conv.__dict__["_fold_key"] = key
            bn._bypassed = True

    def folding_active(self) -> bool:
        """Whether the last forward pass ran with folded BatchNorm everywhere."""
        pairs = self._pairs_cache or []
        return bool(pairs) and all(bn._bypassed for _, bn in pairs)

    # -- public API ---------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's own input normalization of RGB images in [0, 1]."""
        return images * self.input_scale + self.input_shift

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: float32 [B,3,H,W], RGB in [0,1].

        Applies the backbone's own input normalization (callers never normalize) and returns
        one feature map per selected layer, in ``self.layers`` order. The trunk stops after
        the deepest selected layer.
        """
        if not self.ready:
            raise NotFittedError(f"Backbone {self.name} needs its weights file (--set weights=PATH) or a fitted model")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"{self.name} expects images of shape [B, 3, H, W], got {tuple(images.shape)}")
        self._sync_folding()
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            feats = self._extract(x)
            return [feats[name].contiguous() for name in self.layers]
        feats = self._extract(x)
        return [feats[name] for name in self.layers]

    def channels(self) -> list[int]:
        """Channels of each selected layer's feature map, in ``self.layers`` order."""
        return [self._channels[name] for name in self.layers]

    def strides(self) -> list[int]:
        """Stride of each selected layer's feature map relative to the input, in order."""
        return [self._strides[name] for name in self.layers]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, layers={self.layers!r}, fuse_batchnorm={self.fuse_batchnorm}, "
            f"channels_last={self.channels_last}"
        )


def resolve_layers(info: BackboneInfo, layers: Sequence[str] | str | None) -> tuple[str, ...]:
    """Check requested layer names against ``info``; ``None`` means the default layers."""
    if layers is None:
        return info.default_layers
    if isinstance(layers, str):
        layers = (layers,)
    requested = tuple(layers)
    valid = ", ".join(info.layers)
    if not requested:
        raise ConfigError(f"No layers selected for backbone {info.name}; choose from: {valid}")
    unknown = [name for name in requested if name not in info.layers]
    if unknown:
        raise ConfigError(
            f"Unknown layer name(s) {', '.join(map(repr, unknown))} for backbone {info.name}; valid layers: {valid}"
        )
    dupes = sorted({name for name in requested if requested.count(name) > 1})
    if dupes:
        raise ConfigError(f"Layer(s) {', '.join(dupes)} selected more than once for {info.name}")
    return requested


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------


def weights_dir() -> Path:
    """The folder searched for weights files: ``$ANOMNET_WEIGHTS_DIR``, else ~/.cache/anomnet/weights."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "anomnet" / "weights"


def weights_file_patterns(name: str) -> list[str]:
    """File names (glob patterns) looked for in :func:`weights_dir`, in order of preference."""
    return [f"{name}.safetensors", f"{name}.pth", f"{name}-*.pth"]


def find_weights_file(name: str, hint: str = "") -> Path:
    """Find the weights file of backbone ``name`` in :func:`weights_dir` or raise."""
    folder = weights_dir()
    patterns = weights_file_patterns(name)
    if folder.is_dir():
        for pattern in patterns:
            matches = sorted(p for p in folder.glob(pattern) if p.is_file())
            if matches:
                return matches[0]
        where = f"folder {folder}"
    else:
        where = f"folder {folder} (which does not exist)"
    source = (
        f"${WEIGHTS_DIR_ENV}"
        if os.environ.get(WEIGHTS_DIR_ENV)
        else f"the default; set ${WEIGHTS_DIR_ENV} to use another folder"
    )
    raise BackboneWeightsError(
        f"No weights file found for backbone {name}. Searched {where} ({source}) "
        f"for the file names: {', '.join(patterns)}. "
        f"Copy the ImageNet weights file there or pass its path as weights=... "
        f"(anomnet never downloads anything).{(' ' + hint) if hint else ''}"
    )


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.strip().split(". Please use")[0]
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` (weights_only) or ``.safetensors`` file into a flat state dict.

    Accepts a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and strips a ``module.``
    prefix (DataParallel). Raises :class:`BackboneWeightsError` on any problem.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BackboneWeightsError(f"Weights file {path} does not exist")
    if not path.is_file():
        raise BackboneWeightsError(f"Weights path {path} is not a file")

    obj: object
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise BackboneWeightsError(f"Reading {path} needs the safetensors package") from exc
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError and others
            raise BackboneWeightsError(
                f"Weights file {path} cannot be read as safetensors: {_short_reason(exc)}"
            ) from exc
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise BackboneWeightsError(
                f"Weights file {path} was refused: it holds Python objects other than tensors, "
                f"and anomnet loads weights only with torch.load(weights_only=True), which never "
                f"runs code from the file ({_short_reason(exc)}). Save a plain state dict "
                f"(torch.save(model.state_dict(), path)) or a .safetensors file instead."
            ) from exc
        except Exception as exc:  # corrupt zip, text file, truncated file ...
            raise BackboneWeightsError(
                f"Weights file {path} cannot be read: it is not a PyTorch weights file "
                f"(.pth/.pt) or it is damaged ({type(exc).__name__}: {_short_reason(exc)})"
            ) from exc

    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(2):  # {"state_dict": {...}} or {"model": {...}}, possibly nested once more
        if isinstance(obj, Mapping):
            for wrapper in ("state_dict", "model"):
                inner = obj.get(wrapper)
                if isinstance(inner, Mapping):
                    obj = inner
                    break
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(
            f"Weights file {path} is not a state dict (a mapping from parameter names to "
            f"tensors); it holds a {type(obj).__name__}"
        )
    if not obj:
        raise BackboneWeightsError(f"Weights file {path} holds an empty state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneWeightsError(
            f"Weights file {path} is not a state dict: {len(bad)} entries are not tensors ({_list_keys(bad)})"
        )
    state: dict[str, torch.Tensor] = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _list_keys(keys: Sequence[str], limit: int = MAX_LISTED_KEYS) -> str:
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f", ... and {len(keys) - limit} more"
    return shown


def _shape(t: torch.Size | Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in t) + ")"


OPTIONAL_SUFFIXES = ("num_batches_tracked",)
"""State-dict entries a file may lack (old torchvision files have no BatchNorm counters)."""


def drop_ignored(state: Mapping[str, torch.Tensor], ignore_prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    *,
    arch: str,
    source: str | Path,
    ignore_prefixes: Sequence[str] = (),
    guess: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Compare a file's state dict with the architecture's; return the entries to load.

    Keys starting with one of ``ignore_prefixes`` are ignored on both sides. Missing
    ``num_batches_tracked`` counters are filled with zeros. Raises BackboneWeightsError
    listing missing keys, unexpected keys and shape mismatches.
    """
    state = drop_ignored(state, ignore_prefixes)
    expected = {k: v for k, v in expected.items() if not k.startswith(tuple(ignore_prefixes))}
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_list_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_list_keys(unexpected)}")
        if mismatched:
            items = [f"{k} expected {_shape(expected[k])} found {_shape(state[k].shape)}" for k in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es): {_list_keys(items)}")
        guessed = guess(state) if guess is not None else None
        looks_like = f" (the file looks like {guessed} weights)" if guessed and guessed != arch else ""
        raise BackboneWeightsError(
            f"Weights file {source} does not fit backbone {arch}{looks_like}: " + "; ".join(parts) + "."
        )
    out = dict(state)
    for k, shape in expected.items():
        if k not in out:  # optional BatchNorm counter
            out[k] = torch.zeros(shape, dtype=torch.long)
    return out


def freeze(module: nn.Module) -> None:
    """eval() mode and requires_grad=False on every parameter."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
