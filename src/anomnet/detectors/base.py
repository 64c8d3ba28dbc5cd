"""The one detector interface: fit on good images, predict image scores and anomaly maps.

Every method plugs in by subclassing :class:`Detector` and registering itself with
:func:`register`. The CLI, the evaluator and the benchmark only ever talk to this interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from anomnet import tiling
from anomnet.backbones import FeatureExtractor, backbone_state, load_backbone_state
from anomnet.data import Sample, iter_batches
from anomnet.decisions.calibration import Calibration
from anomnet.errors import ConfigError, ModelFormatError, NotFittedError
from anomnet.imageio import image_size
from anomnet.model_io import read_model, write_model
from anomnet.training import FitRecord, seed_everything
from anomnet.transforms import MIN_IMAGE_SIZE, Aspect, Preprocess, choose_aspect, rotate, rotation_angles


@dataclass
class Prediction:
    """Image scores ``[B]`` and anomaly maps ``[B,H,W]`` at the input images' resolution."""

    scores: torch.Tensor
    maps: torch.Tensor


@dataclass
class DetectorConfig:
    """Settings every detector has; subclasses add their own fields (all JSON-serialisable)."""

    image_size: int = 256
    crop: int | None = None
    batch_size: int = 16
    seed: int = 0
    # High-resolution tiling (anomnet.tiling): 0 = off; else the tile side in px of the image at each scale.
    tile: int = 0
    tile_overlap: float = 0.25  # least share of a tile its neighbours overlap
    tile_scales: tuple[float, ...] = (1.0,)  # pyramid scales the image is resized by before tiling
    tile_score: str = "map"  # image score: max of the stitched map ("map") or of the tile scores ("tile")
    # Rotation augmentation of the training images: each is also seen turned by 360 k / n degrees
    # (1 = off; 4 = the quarter turns). For parts whose pose varies on the line.
    train_rotations: int = 1
    # How many of those poses each training input is seen in: 0 = all of them; k = its own pose and k - 1
    # others drawn at random (seeded, per input) from the turned ones: the bank covers every pose at k / n the cost
    train_rotation_samples: int = 0
    # "stretch": every image resized to the square; "pad": aspect ratio kept, the rest mirrored (anomnet.transforms);
    # "auto": pad when the training images' median long/short side is above transforms.PAD_RATIO, else stretch;
    # decided at fit and saved in its place
    aspect: Aspect = "auto"

    # Old setting names -> current ones (old model folders and old command lines keep working).
    ALIASES: ClassVar[dict[str, str]] = {}
    # Inclusive numeric bounds, checked once in __post_init__: name -> (low, high); None = open.
    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "image_size": (MIN_IMAGE_SIZE, 4096),
        "crop": (MIN_IMAGE_SIZE, 4096),
        "batch_size": (1, 4096),
        "tile": (0, 16384),
        "tile_overlap": (0.0, 0.9),
        "train_rotations": (1, 36),
        "train_rotation_samples": (0, 36),
    }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range checks (RANGES of the class and its bases) and Literal choices; ConfigError names the value."""
        ranges: dict[str, tuple[float | None, float | None]] = {}
        for klass in reversed(type(self).__mro__):
            ranges.update(getattr(klass, "RANGES", {}))
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_literal(f.name, value, hints[f.name])
            if f.name in ranges and isinstance(value, int | float) and not isinstance(value, bool):
                low, high = ranges[f.name]
                if value != value or (low is not None and value < low) or (high is not None and value > high):
                    lo = "-inf" if low is None else low
                    hi = "inf" if high is None else high
                    raise ConfigError(f"setting {f.name}={value!r} is out of range [{lo}, {hi}]")
        if self.train_rotation_samples > self.train_rotations:
            raise ConfigError(
                f"setting train_rotation_samples={self.train_rotation_samples!r} is more than the "
                f"train_rotations={self.train_rotations!r} poses it draws from"
            )

    @property
    def poses_per_input(self) -> int:
        """How many poses each training input is seen in (``train_rotation_samples`` of ``train_rotations``)."""
        return self.train_rotation_samples or self.train_rotations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"settings must be a mapping of names to values, got {type(data).__name__}")
        data = {cls.ALIASES.get(k, k): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) for {cls.__name__}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = {}
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            values[name] = _coerce(name, value, hints[name])
        return cls(**values)


def _check_literal(name: str, value: Any, hint: Any) -> None:
    """Raise ConfigError when ``value`` is not one of the choices of a ``Literal`` hint (or Optional Literal)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"setting {name}={value!r} is not one of: {', '.join(map(str, choices))}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a JSON or command-line value into the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        kind = type(choices[0])
        if isinstance(value, str) and kind is not str:
            with contextlib.suppress(ValueError):  # not convertible: _check_literal names the value
                value = kind(value)
        _check_literal(name, value, hint)
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(name, value, args[0])
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(name, v.strip() if isinstance(v, str) else v, args[0]) for v in items)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


class Detector(ABC):
    """Base class of all detectors.

    **Predict-time state: one module.** Everything :meth:`predict_preprocessed` reads lives in
    ``self.model``, one ``nn.Module`` built in ``__init__`` from the config:

    * networks as submodules; banks, centroids, statistics, quantiles as buffers
      (``register_buffer``), named as the saved tensors are named (the ``state_dict`` keys);
    * a buffer that fit fills is registered empty (``torch.empty(0)``): the detector is
      :attr:`fitted` when no buffer of ``self.model`` is empty, the one "is it fitted" test. A
      buffer only some fitted models have (an index's cells, the owners of a bank's rows) is
      registered as ``None`` and stays out of the saved file while it is ``None``;
    * settings are not state: the module takes them from the config when it is built, and
      nothing sets them on it later; what is derived from the state (a search index) is rebuilt
      by :meth:`state_loaded`.

    :meth:`save` writes ``self.model.state_dict()`` (:meth:`state_tensors`), except the weights
    of a backbone (:class:`~anomnet.backbones.FeatureExtractor`) that come from an installed
    package, unless :attr:`trains_backbone`. :meth:`load` builds the detector from its saved
    config, replaces each saved buffer by the saved tensor (whatever its shape), loads every
    parameter strictly and calls :meth:`state_loaded`. Tensor names of folders written before
    the state lived in one module are mapped by :attr:`renamed_keys`. ``anomnet.export`` traces
    :meth:`predict_preprocessed` with ``self.model`` registered in the graph, in graph mode
    (:mod:`anomnet.components.graph_mode`): it must trace (no data-dependent Python loops there).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    description: ClassVar[str] = ""
    model: nn.Module  # the predict-time state (see the class docstring)
    # fit changes the backbone's weights: they are saved even when they come from an installed package
    trains_backbone: ClassVar[bool] = False
    # saved tensor names of older model folders: old prefix -> prefix in ``model.state_dict()``
    renamed_keys: ClassVar[dict[str, str]] = {}
    # Extension points (see docs/adding-a-detector.md): the defaults say "not this detector".
    accepts_labelled: ClassVar[bool] = False  # fit reads labelled_validation (defective images), set by api.fit
    can_leave_out: ClassVar[bool] = False  # implements leave_out (calibration "loo"; see supports_leave_out)
    # fit needs good images held out of training (unless given a labelled set): loo keeps api.fit's hold-out
    needs_validation: ClassVar[bool] = False
    # cross-fitting puts fold models' scores on the final model's scale (calibrate.out_of_fold_statistics)
    rescale_folds: ClassVar[bool] = False
    labelled_validation: list[Sample] | None = None

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or self.config_class()
        self.aspect_setting: Aspect = self.config.aspect  # as asked; fit resolves "auto" into the config
        self.preprocess = Preprocess(self.config.image_size, self.config.crop, self.config.aspect)
        c = self.config
        self.tiling = tiling.Tiling(c.tile, c.tile_overlap, tuple(c.tile_scales), c.tile_score) if c.tile else None
        self.calibration = Calibration()
        self.fit_record = FitRecord()  # what the last fit did (anomnet.training); saved with the model

    # -- the interface -----------------------------------------------------------------
    @abstractmethod
    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        """Learn from good images only (``validation`` may be used for normalisation, never the test set)."""

    def start_fit(self, train: Sequence[Sample]) -> torch.Generator:
        """What every fit begins with: a non-empty training set, every generator seeded, a fresh fit record.

        Returns a ``torch.Generator`` seeded with the config's seed for the fit's own draws.
        """
        if not train:
            raise ConfigError(f"{type(self).__name__} needs at least one training image")
        seed_everything(self.config.seed)
        self.fit_record = FitRecord(seed=self.config.seed)
        if self.aspect_setting == "auto":
            self.resolve_aspect(train)
        return torch.Generator().manual_seed(self.config.seed)

    def resolve_aspect(self, train: Sequence[Sample]) -> None:
        """Turn ``aspect="auto"`` into ``"stretch"`` or ``"pad"`` by the training images' sides (headers only).

        The concrete value replaces ``auto`` in the config (so the saved model, its export and every
        prediction use it) and the reason goes into the fit record (``data_sources["aspect"]``).
        """
        aspect, reason = choose_aspect([image_size(s.path) for s in train])
        self.config.aspect = aspect
        c = self.config
        self.preprocess = Preprocess(c.image_size, c.crop, aspect)
        self.fit_record.data_sources["aspect"] = reason

    def describe_aspect(self) -> str | None:
        """One line for the user after fit when ``aspect=auto`` was decided: what, and why (else None)."""
        reason = self.fit_record.data_sources.get("aspect")
        return None if reason is None else f"aspect: {reason}"

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score ``[B,3,H,W]`` RGB images in [0,1] of any size; maps come back at ``H x W``."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"predict expects images of shape [B,3,H,W], got {tuple(images.shape)}")
        if not self.fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load a saved model")
        return self.predict_batch(images)

    def predict_batch(self, images: torch.Tensor) -> Prediction:
        """The prediction of ``[B,3,H,W]`` images that :meth:`predict` checked: preprocessed (or tiled),
        :meth:`predict_preprocessed`, the maps back at ``H x W``. A detector made of detectors (the hybrid)
        overrides this hook: each of its branches preprocesses and tiles as it was fitted."""
        if self.tiling is not None:
            scores, maps = tiling.predict_tiled(
                self.predict_preprocessed, self.preprocess, images, self.tiling, self.config.batch_size
            )
            return Prediction(scores, maps)
        scores, maps = self.predict_preprocessed(self.preprocess(images))
        height, width = images.shape[-2:]
        return Prediction(scores.float(), self.preprocess.restore(maps.float(), (int(height), int(width))))

    def training_batches(
        self, samples: Sequence[Sample], progress: str | None = None, augment: bool = True
    ) -> Iterator[torch.Tensor]:
        """What the network trains on, preprocessed, ``batch_size`` at a time: ``[b,3,S,S]``.

        The whole images resized, or with tiling their tiles; with ``train_rotations`` > 1 (and
        ``augment``) each batch also in its turned poses: all of them, or with ``train_rotation_samples``
        = k each input in k - 1 turned poses drawn for it (seeded). Every detector's fit (and any statistic
        it takes over images) reads its inputs here, so tiling and rotation work for all of them.
        """
        if self.config.aspect == "auto":  # a fit that did not begin with start_fit: decided by these images
            self.resolve_aspect(samples)
        angles = rotation_angles(self.config.train_rotations) if augment else (0.0,)
        drawn = self.config.poses_per_input if augment else 1
        generator = torch.Generator().manual_seed(self.config.seed)
        if self.tiling is not None:
            batches: Iterator[torch.Tensor] = tiling.training_batches(
                samples, self.tiling, self.preprocess, self.config.batch_size, progress
            )
        else:
            batches = (
                self.preprocess(b.images)
                for b in iter_batches(samples, self.config.batch_size, size=self._load_size, progress=progress)
            )
        for images in batches:
            if drawn == len(angles):
                for angle in angles:
                    yield images if angle == 0.0 else rotate(images, angle)
                continue
            yield images
            # per input, drawn - 1 distinct poses out of the turned ones (indices 1 .. n-1 of angles)
            order = torch.rand(images.shape[0], len(angles) - 1, generator=generator).argsort(dim=1) + 1
            for column in order[:, : drawn - 1].T:
                yield _rotate_each(images, column, angles)

    @property
    def _load_size(self) -> int | None:
        """Images are resized while read, except with ``aspect="pad"`` (which needs their own shape)."""
        self.preprocess.check_resolved()  # "auto" before fit decided it: no guess
        return self.config.image_size if self.config.aspect == "stretch" else None

    def training_count(self, samples: Sequence[Sample], augment: bool = True) -> int:
        """How many inputs :meth:`training_batches` yields for ``samples`` (images, or tiles, times the poses)."""
        n = len(samples) if self.tiling is None else tiling.count_training_tiles(samples, self.tiling)
        return n * (self.config.poses_per_input if augment else 1)

    def input_owners(self, samples: Sequence[Sample]) -> InputOwners:
        """Tracks which of ``samples`` each input of :meth:`training_batches` comes from (leave-one-image-out)."""
        if self.tiling is None:
            counts = [1] * len(samples)
        else:
            counts = [tiling.count_tiles(image_size(s.path), self.tiling) for s in samples]
        return InputOwners(counts, self.config.poses_per_input)

    @abstractmethod
    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and maps ``[B,S,S]`` for images already preprocessed to ``S x S``."""

    # -- the predict-time state --------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """True once fit or load has filled the model: no buffer of ``self.model`` is empty."""
        return all(buffer.numel() > 0 for buffer in self.model.buffers())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to predict, by ``self.model.state_dict()`` name (saved with safetensors)."""
        if not self.fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: nothing to save")
        state = dict(self.model.state_dict())
        for prefix, backbone in _backbones(self.model):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            saved = dict(backbone.state_dict()) if self.trains_backbone else backbone_state(backbone)
            state.update({prefix + k: v for k, v in saved.items()})
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (names of older folders mapped by :attr:`renamed_keys`)."""
        tensors = {_renamed(k, self.renamed_keys): v for k, v in tensors.items()}
        for prefix, backbone in _backbones(self.model):
            load_backbone_state(backbone, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        modules = dict(self.model.named_modules())
        for key, value in tensors.items():
            owner, _, name = key.rpartition(".")
            if owner in modules and name in modules[owner]._buffers:  # the saved shape (empty or None before fit)
                modules[owner]._buffers[name] = value.contiguous()
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not any(k.startswith(p) for p, _ in _backbones(self.model))]
        if missing or unexpected:
            raise KeyError(f"missing tensors {missing[:3]}, unknown tensors {unexpected[:3]}")
        self.model.eval().requires_grad_(False)
        self.state_loaded()

    def state_loaded(self) -> None:
        """Rebuild what is derived from the loaded state (a search index); the default: nothing."""
        return None

    # -- extension points --------------------------------------------------------------
    @property
    def supports_leave_out(self) -> bool:
        """True when this fitted detector can score a training image without that image's own contribution."""
        return False

    def leave_out(self, images: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Predict, within the block, as if the training images at the positions ``images`` were not learned."""
        raise ConfigError(f"the {self.name} detector cannot leave a training image out")

    def fold_settings(self) -> dict[str, str]:
        """Settings that make a cross-fitting fold model (fitted on a share of this fitted detector's training
        images) train as this one did, so its out-of-fold scores are on this model's scale; the default: none."""
        return {}

    @property
    def backbone_name(self) -> str | None:
        """The backbone the detector predicts with, if it has a backbone setting."""
        return getattr(self.config, "backbone", None)

    def fitted_branches(self) -> dict[str, Detector]:
        """The fitted detectors this one is made of, by alias (empty: it is not made of branches)."""
        return {}

    @property
    def choice(self) -> dict[str, Any] | None:
        """Which of its branches a detector made of branches predicts with, and the evidence (None: no choice)."""
        return None

    def describe_choice(self) -> str | None:
        """One line for the user after fit: what predicts, and why (None: nothing to say)."""
        return None

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        meta = {
            "detector": self.name,
            "config": self.config.to_dict(),
            "calibration": self.calibration.to_dict(),
            "fit_record": self.fit_record.to_dict(),
        }
        return write_model(directory, meta, self.state_tensors())

    @staticmethod
    def load(directory: str | Path) -> Detector:
        meta, tensors = read_model(directory)
        name = meta.get("detector")
        if name not in DETECTORS:
            raise ModelFormatError(
                f"{directory}: unknown detector {name!r}; this anomnet has {', '.join(sorted(DETECTORS))}"
            )
        cls = DETECTORS[name]
        try:
            detector = cls(cls.config_class.from_dict(saved_config(meta.get("config", {}))))
            detector.calibration = Calibration.from_dict(meta.get("calibration", {}))
            detector.fit_record = FitRecord.from_dict(meta.get("fit_record"))
            detector.load_state_tensors(tensors)
        except ConfigError as exc:
            raise ModelFormatError(f"{directory}: settings do not fit this anomnet ({exc})") from None
        except (KeyError, RuntimeError, TypeError) as exc:
            raise ModelFormatError(f"{directory}: saved tensors do not fit the {name} detector ({exc})") from None
        return detector


def _rotate_each(images: torch.Tensor, poses: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
    """``images[i]`` turned by ``angles[poses[i]]``, in their order (one :func:`rotate` per distinct angle)."""
    out = torch.empty_like(images)
    for pose in poses.unique().tolist():
        chosen = poses == pose
        out[chosen] = rotate(images[chosen], angles[pose])
    return out


LEGACY_ASPECT = "stretch"
"""``aspect`` of a model folder saved before the setting existed (what every model did then)."""


def saved_config(config: Any) -> Any:
    """A saved model's settings as they were fitted: a folder older than ``aspect`` stretched its images,
    so it keeps stretching (not ``auto``, today's default, which only a fit can decide)."""
    if isinstance(config, dict) and "aspect" not in config:
        return {**config, "aspect": LEGACY_ASPECT}
    return config


def _backbones(model: nn.Module) -> list[tuple[str, FeatureExtractor]]:
    """The backbones inside ``model``, each with the prefix of its tensor names."""
    return [(name + ".", m) for name, m in model.named_modules() if isinstance(m, FeatureExtractor)]


def _renamed(key: str, renames: dict[str, str]) -> str:
    old = next((p for p in renames if key.startswith(p)), None)
    return key if old is None else renames[old] + key[len(old) :]


class InputOwners:
    """The training image of each input :meth:`Detector.training_batches` yields, batch by batch.

    Inputs come image by image (``per_image[i]`` inputs for image ``i``: 1, or its tiles), a batch
    at a time; with ``rotations`` > 1 each batch comes again in every turned pose.
    """

    def __init__(self, per_image: Sequence[int], rotations: int) -> None:
        self.owner = torch.repeat_interleave(
            torch.arange(len(per_image), dtype=torch.int32), torch.as_tensor(per_image, dtype=torch.int64)
        )
        self.rotations = rotations
        self.pos = 0
        self.batches = 0
        self.current = torch.empty(0, dtype=torch.int32)
        self.consistent = True

    def next_batch(self, size: int) -> torch.Tensor:
        if self.batches % self.rotations == 0:
            self.current = self.owner[self.pos : self.pos + size]
            self.pos += size
        self.batches += 1
        if self.current.numel() != size:  # the counts did not match the batches: owners unknown
            self.consistent = False
            return torch.full((size,), -1, dtype=torch.int32)
        return self.current

    def complete(self) -> bool:
        return self.consistent and self.pos == self.owner.numel()


DETECTORS: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to the registry under ``cls.name``."""
    DETECTORS[cls.name] = cls
    return cls


def create_detector(name: str, settings: dict[str, Any] | None = None) -> Detector:
    """Build a detector by name with settings given as strings or values."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(DETECTORS))}")
    cls = DETECTORS[name]
    return cls(cls.config_class.from_dict(settings or {}))
