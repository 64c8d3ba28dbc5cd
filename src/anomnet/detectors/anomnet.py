"""AnomNet (Gao et al., J. Imaging 2025, 11, 301): centroid-guided contrastive learning on frozen features.

Features of several levels of a frozen ImageNet CNN (EfficientNet-Lite stage2-4 by default) are
brought to one grid (stride 8: finer levels by adaptive average pooling, coarser ones
bilinearly) and concatenated. A CoordConv adapter (x and y coordinate channels appended, then a
light convolution) maps them into the space where ``K`` centroids live. Training has two stages:

1. centroid optimisation: ``alpha L_att + beta L_sep + gamma L_ent`` (adapter and centroids);
2. centroid-guided contrastive learning, centroids fixed: ``delta L_att + lambda L_con``.

A location scores its distance to the nearest centroid; the map is upsampled to the network's
input, Gaussian-smoothed and min-max normalised with statistics of the good validation images
(good images fall in [0, 1], defects exceed 1; values are not clipped); the image score is the
map's maximum.

The backbone is frozen, so ``fit`` extracts the training features once into a cache and trains
adapter and centroids on that cache for every epoch; a step pushes a bounded random sample of
the batch's locations (``att_samples``) through the 1x1 adapter. Centroids start from k-means
(k-means++ seeds and Lloyd iterations) on the features.

Collapse guard (``adapter="residual"``, the default): the adapter is ``f + s U V [f, x, y]``
of rank ``adapter_rank``, starts as the identity (``U = 0``), and ``s`` caps the operator norm of
the residual branch at ``max_residual < 1``, so no direction of the features can shrink by more
than that factor however long it trains. ``adapter="plain"`` is the unguarded CoordConv.
The measured choices and the ablation settings are in docs/anomnet.md.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.backbones import DEFAULT_BACKBONE, FeatureExtractor, available_backbones, create_backbone, get_backbone_info
from anomnet.data import Sample
from anomnet.detectors.anomnet_losses import (
    ENTROPY_ESTIMATORS,
    attraction_loss,
    centroid_entropy,
    contrastive_losses,
    nearest_centroid,
    pseudo_labels,
    sample_rows,
    separation_loss,
)
from anomnet.detectors.base import Detector, DetectorConfig, register
from anomnet.errors import ConfigError
from anomnet.transforms import upsample_maps

ADAPTERS = ("residual", "plain")
CENTROID_INITS = ("kmeans", "kmeans++", "mean")
NORMALIZATIONS = ("none", "scale", "channel")


@dataclass
class AnomNetConfig(DetectorConfig):
    batch_size: int = 32  # images per training step (and per feature-extraction batch)
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] | None = None  # None: stage2-4 (EfficientNet-Lite), layer1-3 (ResNets)
    weights: str | None = None  # backbone weights file (ResNet family); stored inside the model
    grid_stride: int = 8  # levels are pooled (finer) or interpolated (coarser) to the input / grid_stride grid (0: the finest level's)
    patch_size: int = 3  # local average over a patch_size^2 neighbourhood of each level (1: none)
    normalize: str = "none"  # before the adapter: "none", "scale" (one scalar: RMS distance to the mean = 1) or "channel" (per-channel mean/std)
    # adapter (CoordConv) and collapse guard
    adapter: str = "residual"  # "residual" (guarded, low rank, starts at identity) or "plain" (unguarded)
    adapter_rank: int = 32  # rank of the residual adapter
    max_residual: float = 0.5  # guard: operator-norm bound of the residual branch (< 1)
    adapter_kernel: int = 1  # kernel size of the adapter's convolution
    coord_weight: float = 0.0  # the x, y channels (times this) are also appended to the adapted features
    # centroids
    num_centroids: int = 1024
    centroid_init: str = "kmeans"  # "kmeans" (k-means++ seeds + Lloyd), "kmeans++" (seeds only), "mean" (+ noise)
    init_samples: int = 50_000  # features the initialisation sees
    init_noise: float = 0.1  # "mean" init: noise std relative to the features' per-dimension std
    # losses (stage 1: alpha, beta, gamma; stage 2: delta, lambda_con)
    stages: int = 2  # 2: the two AnomNet stages; 1: one joint stage with every enabled loss
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
    entropy: str = "diag"  # "diag" (per-dimension variances) or "logdet" (regularised full covariance)
    margin: float = 0.1  # m of L_neg
    con_samples: int = 2048  # features per step in the quadratic contrastive loss
    att_samples: int = 16384  # features per step through adapter and attraction (0: all of the batch)
    # optimisation
    epochs1: int = 10
    epochs2: int = 10
    lr: float = 1e-3  # the paper: 1e-4 (measured: slightly worse here, see docs/anomnet.md)
    weight_decay: float = 5e-4  # on the adapter's weights (not on the centroids)
    cache_dtype: str = "float32"  # "float16" halves the training-feature cache
    # scoring
    blur_sigma: float = 4.0


def default_layers(backbone: str) -> tuple[str, ...] | None:
    """AnomNet's layers when none are given: strides 4, 8 and 16 (measured on bottle, docs/anomnet.md)."""
    info = get_backbone_info(backbone)
    for wanted in (("stage2", "stage3", "stage4"), ("layer1", "layer2", "layer3")):
        if set(wanted) <= set(info.layers):
            return wanted
    return None  # the backbone's own default


def backbone_needs_file(name: str) -> bool:
    return any(b.name == name and b.needs_weights_file for b in available_backbones())


class MultiLevelFeatures(nn.Module):
    """Backbone levels -> one grid, concatenated: ``[B, C, h, w]``.

    The grid is ``ceil(input / grid_stride)`` (or the finest level's with ``grid_stride=0``); finer
    levels are brought to it by adaptive average pooling, coarser ones by bilinear interpolation,
    after an optional ``patch_size`` local average of each level.
    """

    def __init__(self, backbone: FeatureExtractor, patch_size: int, grid_stride: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.grid_stride = grid_stride
        strides = backbone.strides()
        self.finest = min(range(len(strides)), key=lambda i: strides[i])

    @property
    def channels(self) -> int:
        return sum(self.backbone.channels())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = self.backbone(images)
        if self.grid_stride > 0:
            size = tuple(-(-s // self.grid_stride) for s in images.shape[-2:])
        else:
            size = tuple(levels[self.finest].shape[-2:])
        pad = self.patch_size // 2
        out = []
        for f in levels:
            if self.patch_size > 1:
                f = F.avg_pool2d(f, self.patch_size, stride=1, padding=pad, count_include_pad=False)
            if f.shape[-2] > size[0] or f.shape[-1] > size[1]:
                f = F.adaptive_avg_pool2d(f, size)
            elif f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        return torch.cat(out, dim=1)


def coordinates(h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[h * w, 2]``: x and y in [-1, 1] of each location (pixel centres), row-major."""
    ys = (torch.arange(h, dtype=dtype) + 0.5) / h * 2.0 - 1.0
    xs = (torch.arange(w, dtype=dtype) + 0.5) / w * 2.0 - 1.0
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(h * w, 2)


class CoordConvAdapter(nn.Module):
    """CoordConv feature adapter: x and y channels appended, then a light convolution.

    ``residual``: ``f + s U(V([f, x, y]))`` with V: ``C + 2 -> rank`` (``kernel`` x ``kernel``),
    U: ``rank -> C`` (1x1, zero init: the adapter starts as the identity), no biases. The
    collapse guard: ``s = min(1, max_residual / ||U V_f||)``, where ``||U V_f||`` is the sum over
    kernel taps of the spectral norms of the feature part, bounds the operator norm of the
    residual branch on the features by ``max_residual = rho < 1``; so ``||A f - A f'|| >=
    (1 - rho) ||f - f'||`` for features at the same location: no direction of the features can
    lose more than ``1 - (1 - rho)^2`` of its variance, whatever the training does.
    ``plain``: one ``C + 2 -> C`` convolution with bias and PyTorch's default init (no guard).
    With ``coord_weight > 0`` the coordinates times that weight are appended to the output too.

    A 1x1 adapter works on rows ``[R, C]`` (:meth:`forward_rows`), so training can push only a
    sample of locations through it; a larger kernel needs whole maps (:meth:`forward`).
    """

    def __init__(
        self, dim: int, kind: str = "residual", rank: int = 32, kernel: int = 1, coord_weight: float = 0.0, max_residual: float = 0.5
    ) -> None:
        super().__init__()
        self.kind = kind
        self.max_residual = max_residual
        self.kernel = kernel
        self.coord_weight = coord_weight
        pad = kernel // 2
        if kind == "residual":
            self.down = nn.Conv2d(dim + 2, rank, kernel, padding=pad, bias=False)
            self.up = nn.Conv2d(rank, dim, 1, bias=False)
            nn.init.zeros_(self.up.weight)
        elif kind == "plain":
            self.conv = nn.Conv2d(dim + 2, dim, kernel, padding=pad, bias=True)
        else:
            raise ConfigError(f"unknown adapter {kind!r}; use one of {', '.join(ADAPTERS)}")

    def residual_scale(self) -> torch.Tensor:
        """``s`` of the residual branch (1 while its operator norm is within ``max_residual``)."""
        up = self.up.weight[:, :, 0, 0]
        taps = self.down.weight[:, :-2].permute(2, 3, 0, 1).reshape(-1, *self.down.weight.shape[:1], self.down.weight.shape[1] - 2)
        norm = sum(torch.linalg.matrix_norm(up @ tap, ord=2) for tap in taps)
        assert isinstance(norm, torch.Tensor)
        return torch.clamp(self.max_residual / (norm + 1e-12), max=1.0)

    def _with_coords(self, out: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return torch.cat([out, self.coord_weight * xy], dim=1) if self.coord_weight > 0 else out

    def forward_rows(self, x: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """1x1 adapter on rows: features ``[R, C]`` and their coordinates ``[R, 2]`` -> ``[R, D]``."""
        if self.kernel != 1:
            raise ConfigError("forward_rows needs a 1x1 adapter")
        if self.kind == "residual":
            w = self.down.weight[:, :, 0, 0]
            hidden = x @ w[:, :-2].T + xy @ w[:, -2:].T
            out = x + self.residual_scale() * (hidden @ self.up.weight[:, :, 0, 0].T)
        else:
            w = self.conv.weight[:, :, 0, 0]
            out = torch.addmm(self.conv.bias, x, w[:, :-2].T) + xy @ w[:, -2:].T
        return self._with_coords(out, xy)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Feature maps ``[B, C, h, w]`` -> adapted rows ``[B * h * w, D]`` (row-major locations)."""
        b, c, h, w = f.shape
        xy = coordinates(h, w, f.dtype).to(f.device)
        if self.kernel == 1:
            return self.forward_rows(f.permute(0, 2, 3, 1).reshape(-1, c), xy.repeat(b, 1))
        grid = xy.T.reshape(1, 2, h, w).expand(b, -1, -1, -1)
        g = torch.cat([f, grid], dim=1)
        out = f + self.residual_scale() * self.up(self.down(g)) if self.kind == "residual" else self.conv(g)
        return self._with_coords(out.permute(0, 2, 3, 1).reshape(b * h * w, -1), xy.repeat(b, 1))


@functools.lru_cache(maxsize=8)
def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """``[n, n]`` matrix ``T`` with ``x @ T`` = :func:`~anomnet.transforms.gaussian_blur` along the last axis.

    Same kernel (radius ``4 sigma``, truncated and renormalised on short axes) and the same
    reflect padding, folded into the matrix.
    """
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    pad = min(radius, n - 1)
    kernel = kernel[radius - pad : radius + pad + 1]
    kernel = kernel / kernel.sum()
    out = torch.arange(n)[:, None]  # output position
    src = out + torch.arange(-pad, pad + 1)[None]  # input position before reflection
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    t = torch.zeros(n, n, dtype=torch.float64)
    t.index_put_((src.reshape(-1), out.expand_as(src).reshape(-1)), kernel.repeat(n), accumulate=True)
    return t.float()


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 10) -> torch.Tensor:
    """k-means++ seeding (``iterations=0``) followed by Lloyd iterations; ``[k, D]``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: repeat a random point
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(closest / total, 1, generator=generator))
        centers.append(x[idx])
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centers).clone()
    for _ in range(iterations):
        assign = nearest_centroid(x, c)[1]
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c


@register
class AnomNet(Detector):
    name = "anomnet"
    config_class = AnomNetConfig
    description = "AnomNet: CoordConv adapter + centroids, centroid-guided contrastive learning (Gao et al. 2025)"
    config: AnomNetConfig

    def __init__(self, config: AnomNetConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self._check_config()
        self._weights_from_file = backbone_needs_file(c.backbone)
        self.features = self._build_features("random" if self._weights_from_file else None)
        dim = self.features.channels
        self.adapter = CoordConvAdapter(dim, c.adapter, c.adapter_rank, c.adapter_kernel, c.coord_weight, c.max_residual)
        self.register_stats(torch.zeros(dim), torch.ones(dim))
        self.centroids: torch.Tensor | None = None
        self.norm = torch.tensor([0.0, 1.0])  # [low, high] of the validation maps
        self.history: list[dict[str, Any]] = []  # per-epoch losses and feature variance of the last fit
        self.timings: dict[str, float] = {}  # seconds per phase of the last fit

    def _check_config(self) -> None:
        c = self.config
        checks = [
            (c.adapter in ADAPTERS, f"adapter must be one of {', '.join(ADAPTERS)}, got {c.adapter!r}"),
            (c.centroid_init in CENTROID_INITS, f"centroid_init must be one of {', '.join(CENTROID_INITS)}, got {c.centroid_init!r}"),
            (c.entropy in ENTROPY_ESTIMATORS, f"entropy must be one of {', '.join(ENTROPY_ESTIMATORS)}, got {c.entropy!r}"),
            (c.stages in (1, 2), f"stages must be 1 or 2, got {c.stages}"),
            (c.num_centroids >= 1, f"num_centroids must be at least 1, got {c.num_centroids}"),
            (c.adapter_rank >= 1, f"adapter_rank must be at least 1, got {c.adapter_rank}"),
            (0.0 <= c.max_residual < 1.0, f"max_residual must be in [0, 1), got {c.max_residual}"),
            (c.adapter_kernel >= 1 and c.adapter_kernel % 2 == 1, f"adapter_kernel must be a positive odd number, got {c.adapter_kernel}"),
            (c.grid_stride >= 0, f"grid_stride must be 0 or more, got {c.grid_stride}"),
            (c.patch_size >= 1 and c.patch_size % 2 == 1, f"patch_size must be a positive odd number, got {c.patch_size}"),
            (c.epochs1 >= 0 and c.epochs2 >= 0, "epochs1 and epochs2 must be 0 or more"),
            (c.lr > 0, f"lr must be positive, got {c.lr}"),
            (c.normalize in NORMALIZATIONS, f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {c.normalize!r}"),
            (c.cache_dtype in ("float32", "float16"), f"cache_dtype must be float32 or float16, got {c.cache_dtype!r}"),
            (c.init_samples >= 1, f"init_samples must be at least 1, got {c.init_samples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def _build_features(self, weights: str | None) -> MultiLevelFeatures:
        c = self.config
        layers = c.layers if c.layers is not None else default_layers(c.backbone)
        return MultiLevelFeatures(create_backbone(c.backbone, layers, weights), c.patch_size, c.grid_stride).eval()

    def register_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feat_mean = mean.float().contiguous()
        self.feat_std = std.float().contiguous()

    # -- features ----------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> concatenated backbone features ``[B, C, h, w]``."""
        with torch.inference_mode():
            return self.features(images)

    def adapt(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B, C, h, w]`` -> adapted features ``[B * h * w, D]`` (row-major)."""
        if self.config.normalize != "none":
            feats = (feats - self.feat_mean[None, :, None, None]) / self.feat_std[None, :, None, None]
        return self.adapter(feats)

    def _cache_features(self, train: Sequence[Sample], progress: bool) -> torch.Tensor:
        """Backbone features of every training image, channels last: ``[N, h, w, C]``."""
        dtype = torch.float16 if self.config.cache_dtype == "float16" else torch.float32
        cache: torch.Tensor | None = None
        filled = 0
        bar = "features" if progress else None
        for images in self.training_batches(train, bar):  # whole images, or tiles
            f = self.extract(images).permute(0, 2, 3, 1)
            if cache is None:
                cache = torch.empty((self.training_count(train), *f.shape[1:]), dtype=dtype)
            cache[filled : filled + len(f)] = f
            filled += len(f)
        assert cache is not None
        return cache

    @staticmethod
    def _channel_stats(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = cache.shape[-1]
        s = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        for chunk in cache.split(16):
            x = chunk.reshape(-1, c).double()
            s += x.sum(0)
            s2 += (x * x).sum(0)
        n = cache.shape[0] * cache.shape[1] * cache.shape[2]
        mean = s / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        return mean.float(), std.float()

    def _adapted_rows(self, cache: torch.Tensor, images: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """Adapted features ``[R, D]`` of the (image, location) pairs; autograd follows the adapter.

        A 1x1 adapter sees only these rows; a larger kernel runs on the whole maps of their images.
        """
        _, h, w, _ = cache.shape
        if self.adapter.kernel == 1:
            x = cache[images, locations // w, locations % w].float()
            if self.config.normalize != "none":
                x = (x - self.feat_mean) / self.feat_std
            return self.adapter.forward_rows(x, coordinates(h, w)[locations])
        uniq, inverse = images.unique(return_inverse=True)
        parts: list[torch.Tensor] = []
        order: list[torch.Tensor] = []
        step = 32
        for start in range(0, len(uniq), step):
            f = self.adapt(cache[uniq[start : start + step]].float().permute(0, 3, 1, 2))  # [b*h*w, D]
            sel = ((inverse >= start) & (inverse < start + step)).nonzero()[:, 0]
            parts.append(f[(inverse[sel] - start) * (h * w) + locations[sel]])
            order.append(sel)
        return torch.cat(parts)[torch.cat(order).argsort()]

    # -- training ----------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        if not train:
            raise ConfigError("AnomNet needs at least one training image")
        c = self.config
        torch.manual_seed(c.seed)
        gen = torch.Generator().manual_seed(c.seed)
        if self._weights_from_file:
            self.features = self._build_features(c.weights)
        clock = time.perf_counter()
        self.timings = {}

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.timings[name] = now - clock
            clock = now

        cache = self._cache_features(train, progress)
        lap("features")
        if c.normalize != "none":
            mean, std = self._channel_stats(cache)
            if c.normalize == "scale":  # one scalar for all channels, no centring
                mean, std = torch.zeros_like(mean), torch.full_like(std, float(std.square().sum().sqrt()))
            self.register_stats(mean, std)
        dim = cache.shape[-1]
        self.adapter = CoordConvAdapter(dim, c.adapter, c.adapter_rank, c.adapter_kernel, c.coord_weight, c.max_residual)
        self.history = []
        probe = self._probe_rows(cache, gen)
        self.centroids = self._init_centroids(cache, gen)
        self._record(cache, probe, "init", 0, {})
        lap("init")
        if c.stages == 1:
            self._train_stage(cache, probe, gen, stage=1, epochs=c.epochs1, joint=True, progress=progress)
            lap("stage1")
        else:
            self._train_stage(cache, probe, gen, stage=1, epochs=c.epochs1, joint=False, progress=progress)
            lap("stage1")
            self._train_stage(cache, probe, gen, stage=2, epochs=c.epochs2, joint=False, progress=progress)
            lap("stage2")
        self.adapter.requires_grad_(False)
        self.centroids = self.centroids.detach().contiguous()
        self.norm = self._normalisation(validation, cache)
        lap("normalisation")

    def _probe_rows(self, cache: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed sample of (image, location) pairs, used to monitor the adapted features."""
        n, h, w, _ = cache.shape
        images = torch.randperm(n, generator=gen)[: min(n, 16)]
        count = min(4096, len(images) * h * w)
        flat = torch.randperm(len(images) * h * w, generator=gen)[:count]
        return images[flat // (h * w)], flat % (h * w)

    @torch.no_grad()
    def _record(self, cache: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor], stage: Any, epoch: int, losses: dict[str, float]) -> None:
        assert self.centroids is not None
        feats = self._adapted_rows(cache, *probe)
        entry = {"stage": stage, "epoch": epoch, **losses}
        entry["feature_variance"] = float(feats.var(0).mean())  # mean per-dimension variance
        entry["nearest_distance"] = float(nearest_centroid(feats, self.centroids.detach())[0].sqrt().mean())
        self.history.append(entry)

    @torch.no_grad()
    def _init_centroids(self, cache: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.config
        n, h, w, _ = cache.shape
        count = min(c.init_samples, n * h * w)
        flat = torch.randperm(n * h * w, generator=gen)[:count]
        x = self._adapted_rows(cache, flat // (h * w), flat % (h * w))
        if c.centroid_init == "mean":
            noise = torch.randn(c.num_centroids, x.shape[1], generator=gen) * x.std(0) * c.init_noise
            return x.mean(0)[None] + noise
        return kmeans(x, c.num_centroids, gen, iterations=10 if c.centroid_init == "kmeans" else 0)

    def _train_stage(
        self, cache: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator, stage: int, epochs: int, joint: bool, progress: bool
    ) -> None:
        """Stage 1 (or the joint single stage) trains adapter and centroids; stage 2 the adapter only."""
        c = self.config
        assert self.centroids is not None
        if epochs == 0:
            return
        train_centroids = stage == 1
        centroids = self.centroids.detach().clone().requires_grad_(train_centroids)
        # theta is relative to the RMS distance of a feature to the feature mean (measured on the
        # probe), so one setting fits every backbone and layer choice
        with torch.no_grad():
            theta = c.theta * float(self._adapted_rows(cache, *probe).var(0).sum().sqrt())
        use_att = c.use_att
        use_sep = c.use_sep and train_centroids
        use_ent = c.use_ent and train_centroids
        use_con = c.use_con and (joint or stage == 2)
        w_att = c.alpha if stage == 1 else c.delta
        groups: list[dict[str, Any]] = [{"params": list(self.adapter.parameters()), "weight_decay": c.weight_decay}]
        if train_centroids:
            groups.append({"params": [centroids], "weight_decay": 0.0})
        opt = torch.optim.Adam(groups, lr=c.lr)
        n, h, w, _ = cache.shape
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=epochs, desc=f"stage {stage}", unit="epoch")
        for epoch in range(1, epochs + 1):
            sums: dict[str, float] = {}
            steps = 0
            for index in torch.randperm(n, generator=gen).split(c.batch_size):
                terms: dict[str, torch.Tensor] = {}
                if use_att or use_con:
                    # the batch's locations, or a bounded random sample of them
                    rows = sample_rows(len(index) * h * w, c.att_samples, gen)
                    if rows is None:
                        rows = torch.arange(len(index) * h * w)
                    f = self._adapted_rows(cache, index[rows // (h * w)], rows % (h * w))
                    if use_att:
                        terms["att"] = w_att * attraction_loss(f, centroids)
                    if use_con:
                        sub = sample_rows(len(f), c.con_samples, gen)
                        fs = f if sub is None else f[sub]
                        labels = pseudo_labels(fs.detach(), centroids.detach())
                        l_pos, l_neg = contrastive_losses(fs, labels, c.margin)
                        terms["con"] = c.lambda_con * (l_pos + l_neg)
                if use_sep:
                    terms["sep"] = c.beta * separation_loss(centroids, theta)
                if use_ent:
                    terms["ent"] = -c.gamma * centroid_entropy(centroids, c.entropy)
                if not terms:
                    break
                loss = sum(terms.values())
                assert isinstance(loss, torch.Tensor)
                if loss.requires_grad:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                steps += 1
            self.centroids = centroids.detach()
            self._record(cache, probe, stage, epoch, {k: v / max(steps, 1) for k, v in sums.items()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(variance=f"{self.history[-1]['feature_variance']:.3g}")
        if bar is not None:
            bar.close()
        self.centroids = centroids.detach()

    @torch.no_grad()
    def _normalisation(self, validation: Sequence[Sample], cache: torch.Tensor) -> torch.Tensor:
        """``[low, high]`` of the smoothed maps of the good validation images (training images if none)."""
        lo, hi = float("inf"), float("-inf")
        self.norm = torch.tensor([0.0, 1.0])
        if validation:
            for images in self.training_batches(validation):
                _, maps = self.predict_preprocessed(images)
                lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
        else:
            size = self.preprocess.output_size
            for chunk in cache.split(self.config.batch_size):
                maps = self._maps_from_features(chunk.float().permute(0, 3, 1, 2), (size, size))
                lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
        return torch.tensor([lo, max(hi, lo + 1e-12)])

    # -- inference ---------------------------------------------------------------------
    def _maps_from_features(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Backbone features ``[B, C, h, w]`` -> normalised anomaly maps ``[B, *size]``."""
        assert self.centroids is not None
        b, _, h, w = feats.shape
        d2 = nearest_centroid(self.adapt(feats), self.centroids)[0]
        maps = upsample_maps(d2.sqrt().reshape(b, h, w), size)
        maps = self._blur(maps)
        return (maps - self.norm[0]) / (self.norm[1] - self.norm[0])

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        """:func:`anomnet.transforms.gaussian_blur` as two products with banded matrices (~10x faster)."""
        sigma = self.config.blur_sigma
        if sigma <= 0:
            return maps
        h, w = maps.shape[-2:]
        return blur_matrix(h, sigma).T @ maps @ blur_matrix(w, sigma)

    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.centroids is None:
            raise ConfigError("AnomNet is not fitted: call fit() or load a saved model")
        with torch.inference_mode():
            maps = self._maps_from_features(self.extract(images), tuple(images.shape[-2:]))
        return maps.amax((1, 2)), maps

    # -- persistence -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.centroids is None:
            raise ConfigError("AnomNet is not fitted: nothing to save")
        tensors = {
            "centroids": self.centroids,
            "norm": self.norm,
            "feat_mean": self.feat_mean,
            "feat_std": self.feat_std,
            **{f"adapter.{k}": v.detach() for k, v in self.adapter.state_dict().items()},
        }
        if self._weights_from_file:
            tensors.update({f"backbone.{k}": v for k, v in self.features.backbone.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._weights_from_file:
            prefix = "backbone."
            self.features.backbone.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        prefix = "adapter."
        self.adapter.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.adapter.requires_grad_(False)
        self.register_stats(tensors["feat_mean"], tensors["feat_std"])
        self.norm = tensors["norm"].float()
        self.centroids = tensors["centroids"].float().contiguous()
