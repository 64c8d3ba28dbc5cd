"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

Features of two backbone levels are averaged over a 3x3 neighbourhood, brought to the finer
level's resolution and concatenated. A greedy k-center coreset of the training patches forms
the memory bank; a test patch scores its distance to the nearest bank patch. The image score
is the paper's re-weighted maximum; the map is upsampled and Gaussian-smoothed (sigma 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anomnet.backbones import DEFAULT_BACKBONE, FeatureExtractor, available_backbones, create_backbone
from anomnet.components.coreset import greedy_coreset
from anomnet.data import Sample
from anomnet.detectors.base import Detector, DetectorConfig, register
from anomnet.errors import ConfigError
from anomnet.components.nn_search import NearestNeighbors, faiss_available
from anomnet.components.blur import gaussian_blur
from anomnet.transforms import upsample_maps


@dataclass
class PatchCoreConfig(DetectorConfig):
    backbone: str = DEFAULT_BACKBONE
    layers: tuple[str, ...] | None = None  # None: the backbone's default layers
    weights: str | None = None  # backbone weights file (ResNet family); stored inside the model
    patch_size: int = 3  # neighbourhood of the local aggregation
    embed_dim: int | None = None  # channel pooling of the concatenated features (None: keep all)
    coreset_ratio: float = 0.1
    coreset_projection: int = 32  # dimensions of the random projection used by the coreset distances
    coreset_chunk: int = 200_000  # patches per greedy pass: bounds memory and makes time linear in images
    num_neighbors: int = 9  # bank neighbours used by the re-weighted image score
    blur_sigma: float = 4.0
    nn_backend: str = "auto"  # auto | ivf | faiss | exact (see anomnet.nn_search)
    nn_probe: int = 8  # IVF cells scanned per query


def backbone_needs_file(name: str) -> bool:
    return any(b.name == name and b.needs_weights_file for b in available_backbones())


class PatchFeatures(torch.nn.Module):
    """Backbone levels -> locally aware patch features ``[B, D, h, w]`` at the finest level's grid."""

    def __init__(self, backbone: FeatureExtractor, patch_size: int, embed_dim: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.embed_dim = embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = self.backbone(images)
        size = levels[0].shape[-2:]
        pad = self.patch_size // 2
        out = []
        for f in levels:
            if self.patch_size > 1:
                f = F.avg_pool2d(f, self.patch_size, stride=1, padding=pad, count_include_pad=False)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        feats = torch.cat(out, dim=1)
        if self.embed_dim and self.embed_dim < feats.shape[1]:
            b, c, h, w = feats.shape
            flat = feats.permute(0, 2, 3, 1).reshape(-1, 1, c)
            feats = F.adaptive_avg_pool1d(flat, self.embed_dim).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return feats


@register
class PatchCore(Detector):
    name = "patchcore"
    config_class = PatchCoreConfig
    description = "PatchCore: coreset memory bank of pretrained patch features (Roth et al. 2022)"
    config: PatchCoreConfig

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not 0.0 < c.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {c.coreset_ratio}")
        if c.patch_size < 1 or c.patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be a positive odd number, got {c.patch_size}")
        # ResNet-family weights are read from the user's file by fit() and then travel inside
        # the saved model, so a loaded model never needs the file.
        self._weights_from_file = backbone_needs_file(c.backbone)
        self._saves_backbone = self._weights_from_file  # subclasses that train the backbone set True
        self.features = self._build_features("random" if self._weights_from_file else None)
        self.memory_bank: torch.Tensor | None = None
        self._nn: NearestNeighbors | None = None

    def _build_features(self, weights: str | None) -> PatchFeatures:
        c = self.config
        return PatchFeatures(create_backbone(c.backbone, c.layers, weights), c.patch_size, c.embed_dim).eval()

    # -- training ----------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> patch features ``[B, h, w, D]``."""
        with torch.inference_mode():
            return self.features(images).permute(0, 2, 3, 1).contiguous()

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        if not train:
            raise ConfigError("PatchCore needs at least one training image")
        torch.manual_seed(self.config.seed)
        if self._weights_from_file:
            self.features = self._build_features(self.config.weights)
        self.build_memory_bank(train, progress)

    def build_memory_bank(
        self, train: Sequence[Sample], progress: bool = True, extract: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """Coreset memory bank and search index of the patch features of ``train``.

        ``extract`` maps preprocessed images to patch features ``[B, h, w, D]``; the default is
        :meth:`extract` (this detector's backbone levels), any other feature extractor works.
        """
        extract = extract or self.extract
        chunk = self.config.coreset_chunk
        buf: torch.Tensor | None = None
        filled = 0
        kept: list[torch.Tensor] = []
        bar = "features" if progress else None
        for images in self.training_batches(train, bar):  # whole images, or tiles
            f = extract(images)
            f = f.reshape(-1, f.shape[-1])
            while f.shape[0]:
                if buf is None:  # allocated once: patches per image are fixed by the input size
                    per_image = f.shape[0] // images.shape[0]
                    buf = torch.empty(min(chunk, per_image * self.training_count(train)), f.shape[1])
                take = min(buf.shape[0] - filled, f.shape[0])
                buf[filled : filled + take] = f[:take]
                filled, f = filled + take, f[take:]
                if filled == buf.shape[0]:
                    kept.append(self._subsample(buf[:filled], progress))
                    filled = 0
        if filled:
            assert buf is not None
            kept.append(self._subsample(buf[:filled], progress))
        del buf
        self.memory_bank = torch.cat(kept) if len(kept) > 1 else kept[0]
        self._nn = NearestNeighbors(self.memory_bank, self.config.nn_backend, self.config.nn_probe)

    def _subsample(self, features: torch.Tensor, progress: bool) -> torch.Tensor:
        """Coreset of one chunk of patch features (a copy, so the chunk buffer can be reused)."""
        c = self.config
        count = max(1, int(round(c.coreset_ratio * features.shape[0])))
        idx = greedy_coreset(features, count, c.coreset_projection, c.seed, progress=progress)
        return features[idx].clone()

    # -- inference ---------------------------------------------------------------------
    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._nn is None or self.memory_bank is None:
            raise ConfigError("PatchCore is not fitted: call fit() or load a saved model")
        feats = self.extract(images)
        b, h, w, d = feats.shape
        flat = feats.reshape(-1, d)
        dist, idx = self._nn.search(flat, 1)
        patch_scores = dist[:, 0].reshape(b, h * w)
        nearest = idx[:, 0].reshape(b, h * w)
        scores = self._image_scores(flat.reshape(b, h * w, d), patch_scores, nearest)
        maps = upsample_maps(patch_scores.reshape(b, h, w), tuple(images.shape[-2:]))
        return scores, gaussian_blur(maps, self.config.blur_sigma)

    def _image_scores(self, feats: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Re-weighted maximum patch score (PatchCore eq. 7): ``s = (1 - softmax(distances)_0) * s*``."""
        assert self._nn is not None and self.memory_bank is not None
        best = patch_scores.argmax(1)
        rows = torch.arange(feats.shape[0])
        s_star = patch_scores[rows, best]
        k = min(self.config.num_neighbors, len(self._nn))
        if k < 2:
            return s_star
        m_test = feats[rows, best]  # [B, D] the most anomalous test patch
        m_star = self.memory_bank[nearest[rows, best]]  # its nearest bank patch
        _, support = self._nn.search(m_star, k)  # neighbours of m* in the bank (m* itself first)
        dists = torch.linalg.vector_norm(m_test[:, None, :] - self.memory_bank[support], dim=-1)
        weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weight * s_star

    # -- persistence -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.memory_bank is None:
            raise ConfigError("PatchCore is not fitted: nothing to save")
        tensors = {"memory_bank": self.memory_bank}
        if self._nn is not None and self._nn.centroids is not None:
            tensors["nn_centroids"] = self._nn.centroids
        if self._saves_backbone:
            tensors.update({f"backbone.{k}": v for k, v in self.features.backbone.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._saves_backbone:
            prefix = "backbone."
            self.features.backbone.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.memory_bank = tensors["memory_bank"].float().contiguous()
        backend = self.config.nn_backend
        if backend == "auto":  # search the way the fitted model did: IVF cells saved, or an exact index
            backend = "ivf" if "nn_centroids" in tensors else ("faiss" if faiss_available() else "exact")
        self._nn = NearestNeighbors(self.memory_bank, backend, self.config.nn_probe, tensors.get("nn_centroids"))
