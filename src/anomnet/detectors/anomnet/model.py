"""The module AnomNet predicts with: multi-level features -> CoordConv adapter -> nearest-centroid distance maps."""

from __future__ import annotations

from typing import cast, get_args

import torch
from torch import nn

from anomnet.backbones import get_backbone_info
from anomnet.components import PatchFeatures, gaussian_blur, nearest_centroid
from anomnet.components.graph_mode import graph_mode_active
from anomnet.detectors.anomnet.config import Adapter
from anomnet.errors import ConfigError
from anomnet.transforms import upsample_maps


def default_layers(backbone: str) -> tuple[str, ...] | None:
    """AnomNet's layers when none are given: strides 4, 8 and 16 (measured on bottle, docs/anomnet.md)."""
    info = get_backbone_info(backbone)
    for wanted in (("stage2", "stage3", "stage4"), ("layer1", "layer2", "layer3")):
        if set(wanted) <= set(info.layers):
            return wanted
    return None  # the backbone's own default


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
        self,
        dim: int,
        kind: str = "residual",
        rank: int = 32,
        kernel: int = 1,
        coord_weight: float = 0.0,
        max_residual: float = 0.5,
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
            raise ConfigError(f"unknown adapter {kind!r}; use one of {', '.join(get_args(Adapter))}")

    def residual_scale(self) -> torch.Tensor:
        """``s`` of the residual branch (1 while its operator norm is within ``max_residual``)."""
        if graph_mode_active():  # predict-time weights are fixed: a constant of the exported graph (ONNX has no 2-norm)
            with torch.no_grad():
                return torch.tensor(float(self._residual_scale()))
        return self._residual_scale()

    def _residual_scale(self) -> torch.Tensor:
        up = self.up.weight[:, :, 0, 0]
        taps = (
            self.down.weight[:, :-2]
            .permute(2, 3, 0, 1)
            .reshape(-1, *self.down.weight.shape[:1], self.down.weight.shape[1] - 2)
        )
        norm = torch.stack([torch.linalg.matrix_norm(up @ tap, ord=2) for tap in taps]).sum()
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
            out = torch.addmm(cast(torch.Tensor, self.conv.bias), x, w[:, :-2].T) + xy @ w[:, -2:].T
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


class AnomNetModel(nn.Module):
    """Images -> (image scores ``[B]``, min-max normalised anomaly maps ``[B, H, W]``).

    A location scores its distance to the nearest centroid; the map is upsampled to the input,
    Gaussian-smoothed and normalised with ``norm = [low, high]`` of the good validation maps.
    Buffers: ``feat_mean`` and ``feat_std`` (the feature normalisation), ``centroids`` (empty
    until fit) and ``norm``.
    """

    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    centroids: torch.Tensor
    norm: torch.Tensor

    def __init__(self, features: PatchFeatures, adapter: CoordConvAdapter, normalize: str, blur_sigma: float) -> None:
        super().__init__()
        self.features = features
        self.adapter = adapter
        self.normalize = normalize
        self.blur_sigma = blur_sigma
        dim = features.channels
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.register_buffer("centroids", torch.empty(0))  # [K, D], from fit
        self.register_buffer("norm", torch.tensor([0.0, 1.0]))  # [low, high] of the validation maps

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feat_mean = mean.float().contiguous()
        self.feat_std = std.float().contiguous()

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> concatenated backbone features ``[B, C, h, w]``."""
        with torch.inference_mode():
            return self.features(images)

    def adapt(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B, C, h, w]`` -> adapted features ``[B * h * w, D]`` (row-major)."""
        if self.normalize != "none":
            feats = (feats - self.feat_mean[None, :, None, None]) / self.feat_std[None, :, None, None]
        return self.adapter(feats)

    def maps_from_features(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Backbone features ``[B, C, h, w]`` -> normalised anomaly maps ``[B, *size]``."""
        b, _, h, w = feats.shape
        d2 = nearest_centroid(self.adapt(feats), self.centroids)[0]
        maps = gaussian_blur(upsample_maps(d2.sqrt().reshape(b, h, w), size), self.blur_sigma)
        return (maps - self.norm[0]) / (self.norm[1] - self.norm[0])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            maps = self.maps_from_features(self.extract(images), (int(images.shape[-2]), int(images.shape[-1])))
        return maps.amax((1, 2)), maps
