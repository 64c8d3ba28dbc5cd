"""AnomNet's settings.

Names follow the project's scheme: ``batch_size`` is the feature-extraction / prediction batch,
``train_batch_size`` the images per training step, ``stage1_epochs`` / ``stage2_epochs`` the
budgets. Settings written before that scheme (``epochs1``, ``epochs2``, and ``batch_size``
meaning the training batch) keep loading: see :meth:`AnomNetConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from anomnet.backbones import DEFAULT_BACKBONE
from anomnet.detectors.anomnet.losses import Entropy
from anomnet.detectors.base import DetectorConfig
from anomnet.errors import ConfigError

Adapter = Literal["residual", "plain"]
CentroidInit = Literal["kmeans", "kmeans++", "mean", "coreset"]
Normalization = Literal["none", "scale", "channel"]
CacheDtype = Literal["float32", "float16"]


@dataclass
class AnomNetConfig(DetectorConfig):
    batch_size: int = 32  # images per feature-extraction / prediction batch
    train_batch_size: int = 32  # images per training step
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] | None = None  # None: stage2-4 (EfficientNet-Lite), layer1-3 (ResNets)
    weights: str | None = None  # backbone weights file (ResNet family); stored inside the model
    grid_stride: int = 8  # levels pooled (finer) or interpolated (coarser) to input / grid_stride (0: finest level's)
    patch_size: int = 3  # local average over a patch_size^2 neighbourhood of each level (1: none; odd)
    # before the adapter: "none", "scale" (one scalar: RMS distance to the mean = 1) or "channel" (per-channel mean/std)
    normalize: Normalization = "none"
    # adapter (CoordConv) and collapse guard
    adapter: Adapter = "residual"  # "residual" (guarded, low rank, starts at identity) or "plain" (unguarded)
    adapter_rank: int = 32  # rank of the residual adapter
    max_residual: float = 0.5  # guard: operator-norm bound of the residual branch (< 1)
    adapter_kernel: int = 1  # kernel size of the adapter's convolution (odd)
    coord_weight: float = 0.0  # the x, y channels (times this) are also appended to the adapted features
    # centroids
    num_centroids: int = 1024
    # "kmeans" (k-means++ seeds + Lloyd), "kmeans++" (seeds only), "mean", "coreset" (greedy k-center, as PatchCore)
    centroid_init: CentroidInit = "kmeans"
    # > 0: the centroid count follows the data, max(num_centroids, centroid_ratio x training patches)
    centroid_ratio: float = 0.0
    init_samples: int = 50_000  # features the initialisation sees
    init_noise: float = 0.1  # "mean" init: noise std relative to the features' per-dimension std
    # losses (stage 1: alpha, beta, gamma; stage 2: delta, lambda_con)
    stages: Literal[1, 2] = 2  # 2: the two AnomNet stages; 1: one joint stage with every enabled loss
    use_att: bool = True
    use_sep: bool = True
    use_ent: bool = True
    use_con: bool = True
    alpha: float = 1.0
    beta: float = 0.1
    gamma: float = 0.01
    delta: float = 1.5
    lambda_con: float = 0.8
    theta: float = 0.5  # separation margin, relative to the RMS distance of a feature to the mean
    entropy: Entropy = "diag"  # "diag" (per-dimension variances) or "logdet" (regularised full covariance)
    margin: float = 0.1  # m of L_neg
    con_samples: int = 2048  # features per step in the quadratic contrastive loss
    # centroids per step in the pairwise separation term (0: all); exact below it, a seeded sample above
    sep_samples: int = 2048
    att_samples: int = 16384  # features per step through adapter and attraction (0: all of the batch)
    # optimisation
    stage1_epochs: int = 10
    stage2_epochs: int = 10
    lr: float = 1e-3  # the paper: 1e-4 (measured: slightly worse here, see docs/anomnet.md)
    weight_decay: float = 5e-4  # on the adapter's weights (not on the centroids)
    cache_dtype: CacheDtype = "float32"  # "float16" halves the training-feature cache
    # scoring
    blur_sigma: float = 4.0

    ALIASES: ClassVar[dict[str, str]] = {"epochs1": "stage1_epochs", "epochs2": "stage2_epochs"}
    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "train_batch_size": (1, 4096),
        "grid_stride": (0, 256),
        "patch_size": (1, 31),
        "adapter_rank": (1, None),
        "max_residual": (0.0, 0.999999),
        "adapter_kernel": (1, 31),
        "num_centroids": (1, None),
        "centroid_ratio": (0.0, 1.0),
        "init_samples": (1, None),
        "init_noise": (0.0, None),
        "con_samples": (0, None),
        "sep_samples": (0, None),
        "att_samples": (0, None),
        "stage1_epochs": (0, None),
        "stage2_epochs": (0, None),
        "lr": (1e-12, None),
        "weight_decay": (0.0, None),
        "blur_sigma": (0.0, 64.0),
    }
    OLD_NAMES: ClassVar[frozenset[str]] = frozenset({"epochs1", "epochs2"})

    def validate(self) -> None:
        super().validate()
        for name in ("patch_size", "adapter_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ConfigError(f"setting {name}={getattr(self, name)!r} must be odd")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        """Settings by name; in old ones (with ``epochs1``/``epochs2``) ``batch_size`` was also the training batch."""
        if (
            isinstance(data, dict)
            and cls.OLD_NAMES & set(data)
            and "train_batch_size" not in data
            and "batch_size" in data
        ):
            data = {**data, "train_batch_size": data["batch_size"]}
        return super().from_dict(data)
