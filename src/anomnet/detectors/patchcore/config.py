"""PatchCore's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from anomnet.detectors.base import DetectorConfig
from anomnet.errors import ConfigError

NNBackend = Literal["auto", "ivf", "faiss", "exact"]


@dataclass
class PatchCoreConfig(DetectorConfig):
    # EfficientNet-Lite1, chosen by the suite over Lite0 / Lite2 (docs/design.md, section "Backbone")
    backbone: str = "efficientnet_lite1"
    layers: tuple[str, ...] | None = None  # None: the backbone's default layers
    weights: str | None = None  # backbone weights file (ResNet family); stored inside the model
    patch_size: int = 3  # neighbourhood of the local aggregation (odd)
    embed_dim: int | None = None  # channel pooling of the concatenated features (None: keep all)
    coreset_ratio: float = 0.1
    coreset_max: int = 0  # most patches in the bank (0: no limit); above it the ratio is lowered for every chunk
    coreset_projection: int = 32  # dimensions of the random projection used by the coreset distances
    coreset_chunk: int = 200_000  # patches per greedy pass: bounds memory and makes time linear in images
    num_neighbors: int = 9  # bank neighbours used by the re-weighted image score
    blur_sigma: float = 4.0
    nn_backend: NNBackend = "auto"  # see anomnet.components.nn_search
    nn_probe: int = 8  # IVF cells scanned per query

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "patch_size": (1, 31),
        "embed_dim": (1, None),
        "coreset_ratio": (1e-9, 1.0),
        "coreset_max": (0, None),
        "coreset_projection": (0, None),
        "coreset_chunk": (1, None),
        "num_neighbors": (1, None),
        "blur_sigma": (0.0, 64.0),
        "nn_probe": (1, None),
    }

    def validate(self) -> None:
        super().validate()
        if self.patch_size % 2 == 0:
            raise ConfigError(f"setting patch_size={self.patch_size!r} must be odd")
