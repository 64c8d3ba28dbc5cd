"""AnomNet's fit (feature cache -> k-means centroids -> stage 1 and 2 training -> normalisation) and saved tensors.

The backbone is frozen, so ``fit`` extracts the training features once into a cache and trains
adapter and centroids on that cache for every epoch; a step pushes a bounded random sample of
the batch's locations (``att_samples``) through the 1x1 adapter. Each stage runs through
:func:`anomnet.training.train_phase`, one step per epoch; the per-epoch losses and the feature
variance land in ``fit_record`` (``history`` reads them back).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from anomnet.backbones import build_backbone
from anomnet.components import PatchFeatures, greedy_coreset, kmeans, nearest_centroid
from anomnet.data import Sample
from anomnet.detectors.anomnet.config import AnomNetConfig
from anomnet.detectors.anomnet.losses import (
    attraction_loss,
    centroid_entropy,
    contrastive_losses,
    pseudo_labels,
    sample_rows,
    separation_loss,
)
from anomnet.detectors.anomnet.model import AnomNetModel, CoordConvAdapter, coordinates, default_layers
from anomnet.detectors.base import Detector, register
from anomnet.errors import ConfigError
from anomnet.training import timed_phase, train_phase


@register
class AnomNet(Detector):
    name = "anomnet"
    renamed_keys = {"backbone.": "features.backbone."}  # before the state lived in one module
    config_class = AnomNetConfig
    description = "AnomNet: CoordConv adapter + centroids, centroid-guided contrastive learning (Gao et al. 2025)"
    config: AnomNetConfig
    model: AnomNetModel

    def __init__(self, config: AnomNetConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        features = self._build_features(None)
        self.model = AnomNetModel(features, self._new_adapter(features.channels), c.normalize, c.blur_sigma)

    def _build_features(self, weights: str | None, search: bool = False) -> PatchFeatures:
        c = self.config
        layers = c.layers if c.layers is not None else default_layers(c.backbone)
        backbone = build_backbone(c.backbone, layers, weights, search=search)
        return PatchFeatures(backbone, c.patch_size, grid_stride=c.grid_stride).eval()

    def _new_adapter(self, dim: int) -> CoordConvAdapter:
        c = self.config
        return CoordConvAdapter(dim, c.adapter, c.adapter_rank, c.adapter_kernel, c.coord_weight, c.max_residual)

    @property
    def features(self) -> PatchFeatures:
        return self.model.features

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch losses and feature variance of the last fit (read from ``fit_record``)."""
        return [entry for phase in self.fit_record.phases for entry in phase.extra.get("epochs", [])]

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> concatenated backbone features ``[B, C, h, w]``."""
        return self.model.extract(images)

    # -- training ----------------------------------------------------------------------
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
        if cache is None:
            raise ConfigError("AnomNet got no training inputs")
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
        if self.model.adapter.kernel == 1:
            x = cache[images, locations // w, locations % w].float()
            if self.config.normalize != "none":
                x = (x - self.model.feat_mean) / self.model.feat_std
            return self.model.adapter.forward_rows(x, coordinates(h, w)[locations])
        uniq, inverse = images.unique(return_inverse=True)
        parts: list[torch.Tensor] = []
        order: list[torch.Tensor] = []
        step = 32
        for start in range(0, len(uniq), step):
            f = self.model.adapt(cache[uniq[start : start + step]].float().permute(0, 3, 1, 2))  # [b*h*w, D]
            sel = ((inverse >= start) & (inverse < start + step)).nonzero()[:, 0]
            parts.append(f[(inverse[sel] - start) * (h * w) + locations[sel]])
            order.append(sel)
        return torch.cat(parts)[torch.cat(order).argsort()]

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        gen = self.start_fit(train)
        c = self.config
        if not self.features.backbone.ready:
            self.model.features = self._build_features(c.weights, search=True)
        with timed_phase(self.fit_record, "features"):
            cache = self._cache_features(train, progress)
        with timed_phase(self.fit_record, "init") as init:
            if c.normalize != "none":
                mean, std = self._channel_stats(cache)
                if c.normalize == "scale":  # one scalar for all channels, no centring
                    mean, std = torch.zeros_like(mean), torch.full_like(std, float(std.square().sum().sqrt()))
                self.model.set_stats(mean, std)
            self.model.adapter = self._new_adapter(cache.shape[-1])
            probe = self._probe_rows(cache, gen)
            self.model.centroids = self._init_centroids(cache, gen)
            init.extra["epochs"] = [self._monitor(cache, probe, "init", 0, {})]
        if c.stages == 1:
            self._train_stage(cache, probe, gen, stage=1, epochs=c.stage1_epochs, joint=True, progress=progress)
        else:
            self._train_stage(cache, probe, gen, stage=1, epochs=c.stage1_epochs, joint=False, progress=progress)
            self._train_stage(cache, probe, gen, stage=2, epochs=c.stage2_epochs, joint=False, progress=progress)
        self.model.adapter.requires_grad_(False)
        self.model.centroids = self.model.centroids.detach().contiguous()
        with timed_phase(self.fit_record, "normalisation"):
            self.model.norm = self._normalisation(validation, cache)

    def _probe_rows(self, cache: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed sample of (image, location) pairs, used to monitor the adapted features."""
        n, h, w, _ = cache.shape
        images = torch.randperm(n, generator=gen)[: min(n, 16)]
        count = min(4096, len(images) * h * w)
        flat = torch.randperm(len(images) * h * w, generator=gen)[:count]
        return images[flat // (h * w)], flat % (h * w)

    @torch.no_grad()
    def _monitor(
        self,
        cache: torch.Tensor,
        probe: tuple[torch.Tensor, torch.Tensor],
        stage: Any,
        epoch: int,
        losses: dict[str, float],
    ) -> dict[str, Any]:
        feats = self._adapted_rows(cache, *probe)
        entry: dict[str, Any] = {"stage": stage, "epoch": epoch, **losses}
        entry["feature_variance"] = float(feats.var(0).mean())  # mean per-dimension variance
        entry["nearest_distance"] = float(nearest_centroid(feats, self.model.centroids.detach())[0].sqrt().mean())
        return entry

    @torch.no_grad()
    def _init_centroids(self, cache: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.config
        n, h, w, _ = cache.shape
        k = self.centroid_count(n * h * w)
        count = min(max(c.init_samples, 4 * k), n * h * w)  # an adaptive count gets enough features to choose from
        flat = torch.randperm(n * h * w, generator=gen)[:count]
        x = self._adapted_rows(cache, flat // (h * w), flat % (h * w))
        if c.centroid_init == "mean":
            noise = torch.randn(k, x.shape[1], generator=gen) * x.std(0) * c.init_noise
            return x.mean(0)[None] + noise
        if c.centroid_init == "coreset":
            return x[greedy_coreset(x, min(k, x.shape[0]), projection_dim=32, seed=c.seed)].clone()
        return kmeans(x, k, gen, iterations=10 if c.centroid_init == "kmeans" else 0)

    def centroid_count(self, patches: int) -> int:
        """K: ``num_centroids``, or with ``centroid_ratio`` that share of the training patches if larger."""
        c = self.config
        return max(c.num_centroids, round(c.centroid_ratio * patches)) if c.centroid_ratio > 0 else c.num_centroids

    def _train_stage(
        self,
        cache: torch.Tensor,
        probe: tuple[torch.Tensor, torch.Tensor],
        gen: torch.Generator,
        stage: int,
        epochs: int,
        joint: bool,
        progress: bool,
    ) -> None:
        """Stage 1 (or the joint single stage) trains adapter and centroids; stage 2 the adapter only."""
        c = self.config
        if epochs == 0:
            return
        train_centroids = stage == 1
        centroids = self.model.centroids.detach().clone().requires_grad_(train_centroids)
        # theta is relative to the RMS distance of a feature to the feature mean (measured on the
        # probe), so one setting fits every backbone and layer choice
        with torch.no_grad():
            theta = c.theta * float(self._adapted_rows(cache, *probe).var(0).sum().sqrt())
        use_att = c.use_att
        use_sep = c.use_sep and train_centroids
        use_ent = c.use_ent and train_centroids
        use_con = c.use_con and (joint or stage == 2)
        w_att = c.alpha if stage == 1 else c.delta
        adapter = list(self.model.adapter.parameters())
        groups: list[dict[str, Any]] = [{"params": adapter, "weight_decay": c.weight_decay}]
        if train_centroids:
            groups.append({"params": [centroids], "weight_decay": 0.0})
        opt = torch.optim.Adam(groups, lr=c.lr)
        n, h, w, _ = cache.shape
        epochs_seen: list[dict[str, Any]] = []

        def epoch_step(i: int) -> dict[str, float]:
            sums: dict[str, float] = {}
            steps = 0
            for index in torch.randperm(n, generator=gen).split(c.train_batch_size):
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
                    # L_sep is a mean over centroid pairs: over a seeded sample of centroids it is the same
                    # mean in expectation at O(sep_samples^2) instead of O(K^2) (a bank-sized K)
                    picked = sample_rows(centroids.shape[0], c.sep_samples, gen)
                    terms["sep"] = c.beta * separation_loss(centroids if picked is None else centroids[picked], theta)
                if use_ent:
                    terms["ent"] = -c.gamma * centroid_entropy(centroids, c.entropy)
                if not terms:
                    break
                loss = functools.reduce(torch.add, terms.values())
                if loss.requires_grad:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                steps += 1
            self.model.centroids = centroids.detach()
            entry = self._monitor(cache, probe, stage, i + 1, {k: v / max(steps, 1) for k, v in sums.items()})
            epochs_seen.append(entry)
            return {k: v for k, v in entry.items() if k not in ("stage", "epoch")}

        phase = train_phase(self.fit_record, f"stage{stage}", epoch_step, epochs, progress=progress)
        phase.extra["epochs"] = epochs_seen
        phase.extra["unit"] = "epoch"
        self.model.centroids = centroids.detach()

    @torch.no_grad()
    def _normalisation(self, validation: Sequence[Sample], cache: torch.Tensor) -> torch.Tensor:
        """``[low, high]`` of the smoothed maps of the good validation images (training images if none)."""
        lo, hi = float("inf"), float("-inf")
        self.model.norm = torch.tensor([0.0, 1.0])
        if validation:
            for images in self.training_batches(validation, augment=False):
                _, maps = self.predict_preprocessed(images)
                lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
        else:
            size = self.preprocess.output_size
            for chunk in cache.split(self.config.batch_size):
                maps = self.model.maps_from_features(chunk.float().permute(0, 3, 1, 2), (size, size))
                lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
        return torch.tensor([lo, max(hi, lo + 1e-12)])

    # -- inference ---------------------------------------------------------------------
    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images)
