"""The hybrid's settings: which registered detectors are its branches, their settings, and how one is chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from anomnet.detectors.base import DetectorConfig, saved_config
from anomnet.errors import ConfigError

Mode = Literal["select", "fuse", "auto"]
Criterion = Literal["au_pro@0.05", "au_pro@0.3", "pixel_f1_max", "pixel_auroc", "image_auroc"]
Synthetic = Literal["realistic", "perlin", "cutpaste", "noise"]
Where = Literal["object", "anywhere"]

DEFAULT_BRANCHES: tuple[str, ...] = ("inpformer", "cpr")  # the paper's two branches
NAME = "hybrid"

# Settings of the hybrid every branch takes over when they are given (differ from DetectorConfig's defaults);
# left at the defaults each branch keeps its own.
SHARED = ("image_size", "crop", "batch_size", "tile", "tile_overlap", "tile_scales", "tile_score")
SHARED_ALWAYS = ("seed", "train_rotations", "train_rotation_samples", "aspect")
SHARED_IF_KNOWN = ("backbone", "weights", "defects")  # passed to the branches that have the setting, when set


@dataclass
class HybridConfig(DetectorConfig):
    # Branches: registered detector names, or "alias:detector" (two branches of one detector, e.g.
    # "resized:patchcore,tiled:patchcore" with "--set tiled.tile=512").
    branches: tuple[str, ...] = DEFAULT_BRANCHES
    # alias -> that branch's own settings; on the command line "--set ALIAS.KEY=VALUE"
    branch_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # alias -> the branch's complete settings, resolved when the detector is built and saved with the model
    branch_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # select: predict with the branch of the best criterion; fuse: every branch's map normalised on good
    # validation pixels and averaged; auto: the fused map is one more candidate of the choice
    mode: Mode = "select"
    criterion: Criterion = "au_pro@0.05"  # what the choice maximises on the selection data (docs/hybrid.md)
    synthetic: Synthetic = "realistic"  # defects pasted onto the validation images when no labelled set is given
    # realistic / noise defects centred on the object (pixels unlike the image border; anywhere when there are
    # none, e.g. a texture) or anywhere
    synthetic_where: Where = "object"
    defects: str | None = None  # a folder of real defect crops: the realistic generator's (and CPR's) defects
    textures: str | None = None  # texture folder of the perlin generator (default as ToCoAD's)
    synthetic_per_image: int = 4  # defective copies of each good validation image
    select_side: int = 512  # maps and masks are compared at most this many pixels on the long side
    keep_branches: bool = False  # save every fitted branch (default: only those predict uses)
    backbone: str | None = None  # given to every branch that has a backbone setting
    weights: str | None = None

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "synthetic_per_image": (1, 64),
        "select_side": (32, 8192),
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        """As every config, plus ``ALIAS.KEY`` entries collected into ``branch_settings``."""
        if not isinstance(data, dict):
            raise ConfigError(f"settings must be a mapping of names to values, got {type(data).__name__}")
        data = dict(data)
        given = data.pop("branch_settings", None) or {}
        if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
            raise ConfigError(f"setting branch_settings must map branch names to settings, got {given!r}")
        settings = {str(alias): dict(values) for alias, values in given.items()}
        for key in [k for k in data if "." in k]:
            alias, _, name = key.partition(".")
            if not alias or not name:
                raise ConfigError(f"setting {key!r}: a branch setting is written BRANCH.KEY=VALUE")
            settings.setdefault(alias, {})[name] = data.pop(key)
        if settings:
            data["branch_settings"] = settings
        saved = data.get("branch_configs")
        if isinstance(saved, dict):  # complete saved settings: those saved before `aspect` existed stretched
            data["branch_configs"] = {a: saved_config(v) for a, v in saved.items()}
        config = super().from_dict(data)
        assert isinstance(config, HybridConfig)
        return config

    def validate(self) -> None:
        super().validate()
        specs = self.branch_specs()
        aliases = [a for a, _ in specs]
        for name, table in (("branch_settings", self.branch_settings), ("branch_configs", self.branch_configs)):
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise ConfigError(f"setting {name} must map branch names to settings, got {table!r}")
            unknown = sorted(set(table) - set(aliases))
            if unknown:
                raise ConfigError(
                    f"setting {name} names {', '.join(unknown)}, which is not a branch; branches: {', '.join(aliases)}"
                )
        if self.branch_configs and set(self.branch_configs) != set(aliases):
            raise ConfigError(f"setting branch_configs must hold every branch ({', '.join(aliases)})")

    def branch_specs(self) -> list[tuple[str, str]]:
        """``(alias, detector name)`` of every branch, in order; ConfigError for an unknown or repeated one."""
        from anomnet.detectors.base import DETECTORS

        entries = [str(e).strip() for e in self.branches if str(e).strip()]
        if not entries:
            raise ConfigError("setting branches needs at least one detector, e.g. branches=patchcore,anomnet")
        specs = []
        for entry in entries:
            alias, sep, detector = str(entry).partition(":")
            detector = detector if sep else alias
            if detector not in DETECTORS or detector == NAME:
                known = ", ".join(sorted(n for n in DETECTORS if n != NAME))
                raise ConfigError(f"setting branches: {detector!r} is not a detector a hybrid can use; known: {known}")
            if not alias or "." in alias:
                raise ConfigError(f"setting branches: {entry!r} is not NAME or ALIAS:NAME (no '.' in the alias)")
            specs.append((alias, detector))
        aliases = [a for a, _ in specs]
        if len(set(aliases)) != len(aliases):
            raise ConfigError(f"setting branches names a branch twice: {','.join(self.branches)} (use ALIAS:NAME)")
        return specs
