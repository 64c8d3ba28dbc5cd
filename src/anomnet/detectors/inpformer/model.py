"""The module INP-Former predicts with: frozen encoder -> INP extractor -> bottleneck -> INP-guided decoder.

* **Encoder**: a frozen backbone's levels on one token grid (:class:`~anomnet.components.PatchFeatures`).
  A token is the levels' channels side by side (``fuse="concat"``, CNN levels of different widths)
  or their mean (``"mean"``, the paper's average of ViT layers of one width).
* **INP extractor** (:class:`INPExtractorBlock`): ``M`` learnable queries cross-attend (softmax) to
  the image's own tokens and become that image's intrinsic normal prototypes (INPs), at training
  and at test time alike.
* **Bottleneck**: an MLP on the fused tokens.
* **INP-guided decoder** (:class:`INPDecoderBlock`): each token queries the INPs, which alone give
  the keys and values (cosine attention with a learned per-head scale and ReLU, no softmax, and no
  residual path from the token): a decoder output is a mixture of the image's INPs, so a region
  the INPs do not describe (a defect) cannot be reconstructed.
* **Scoring**: the encoder levels form ``groups``; each group's target is compared with the mean
  of its share of the decoder blocks (mirror order: the last decoder blocks reconstruct the
  shallowest group) by ``1 - cos`` per location; the group maps are upsampled, summed and
  Gaussian-smoothed; the image score is the mean of the top ``top_share`` of the map's pixels.

Prediction is a pure tensor computation (no numpy, no loops over pixels), ready for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.components import PatchFeatures, gaussian_blur
from anomnet.components.score_reduction import top_share_mean
from anomnet.detectors.inpformer.config import INPFormerConfig
from anomnet.detectors.inpformer.losses import cosine_distance_maps
from anomnet.errors import ConfigError
from anomnet.transforms import upsample_maps

NORM_EPS = 1e-8  # the paper's LayerNorm eps in the extractor and decoder


def auto_heads(dim: int) -> int:
    """About one head per 64 channels (ViT-S 6, ViT-B 12, ViT-L 16): the largest divisor of ``dim`` up to that."""
    target = max(1, round(dim / 64))
    return max(h for h in range(1, target + 1) if dim % h == 0)


def split_evenly(n: int, parts: int) -> list[list[int]]:
    """``0 .. n-1`` in ``parts`` contiguous runs, the longer ones first (as numpy.array_split)."""
    if not 1 <= parts <= n:
        raise ConfigError(f"cannot split {n} item(s) into {parts} group(s)")
    size, extra = divmod(n, parts)
    runs, start = [], 0
    for p in range(parts):
        length = size + (1 if p < extra else 0)
        runs.append(list(range(start, start + length)))
        start += length
    return runs


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class INPExtractorBlock(nn.Module):
    """Queries ``[B, M, C]`` attend (softmax) to the image's tokens ``[B, N, C]``; residual on the queries."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)  # shared by queries and tokens, as the paper
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, m, c = queries.shape
        n = tokens.shape[1]
        h = self.heads
        q = self.q(self.norm1(queries)).reshape(b, m, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm1(tokens)).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c / h)) v
        queries = queries + self.proj(out.transpose(1, 2).reshape(b, m, c))
        return queries + self.mlp(self.norm2(queries))


class INPDecoderBlock(nn.Module):
    """Tokens ``[B, N, C]`` query the INPs ``[B, M, C]``, the only keys and values; no residual from the tokens.

    ``attn = relu(scale_h * cos(q_i, k_m))`` (cosine attention, learned per-head scale, no softmax),
    ``y = proj(attn v)``, output ``y + mlp(norm2(y))``. A token sees no other token: changing one
    changes only its own output (tests/test_inpformer.py).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.scale = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def attention(self, tokens: torch.Tensor, inps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attn [B, heads, N, M], values [B, heads, M, C / heads])``: the keys are the INPs, nothing else."""
        b, n, c = tokens.shape
        m = inps.shape[1]
        h = self.heads
        q = self.q(self.norm1(tokens)).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm1(inps)).reshape(b, m, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = torch.relu((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.scale)
        return attn, v

    def forward(self, tokens: torch.Tensor, inps: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        attn, v = self.attention(tokens, inps)
        y = self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return y + self.mlp(self.norm2(y))


class INPFormerModel(nn.Module):
    """Images -> (image scores ``[B]``, anomaly maps ``[B, H, W]``); :meth:`reconstruct` is what training uses.

    The buffer ``train_steps`` ``[1]`` (empty until fit) records the optimisation steps of the fit.
    """

    train_steps: torch.Tensor

    def __init__(self, features: PatchFeatures, config: INPFormerConfig) -> None:
        super().__init__()
        self.features = features
        widths = features.backbone.channels()
        fuse, groups, decoder_depth, mlp_ratio = config.fuse, config.groups, config.decoder_depth, config.mlp_ratio
        if fuse == "auto":
            fuse = "mean" if len(set(widths)) == 1 and len(widths) > 1 else "concat"
        if fuse == "mean" and len(set(widths)) != 1:
            raise ConfigError(f"fuse=mean needs levels of one width, got {widths}: use fuse=concat")
        if fuse not in ("mean", "concat"):
            raise ConfigError(f"unknown fuse {fuse!r}; use auto, concat or mean")
        self.fuse = fuse
        n_groups = groups or (min(2, len(widths)) if fuse == "mean" else len(widths))
        self.level_groups = split_evenly(len(widths), n_groups)
        if decoder_depth < n_groups:
            raise ConfigError(f"decoder_depth={decoder_depth} is below the {n_groups} reconstruction groups")
        self.decoder_groups = split_evenly(decoder_depth, n_groups)
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        self.level_slices = [(offsets[i], offsets[i + 1]) for i in range(len(widths))]
        self.dim = sum(widths) if fuse == "concat" else widths[0]
        heads = config.heads or auto_heads(self.dim)
        if self.dim % heads:
            raise ConfigError(f"heads={heads} does not divide the token width {self.dim}")
        self.heads = heads
        hidden = int(self.dim * mlp_ratio)
        self.inps = nn.Parameter(torch.randn(config.num_inps, self.dim))
        self.extractor = nn.ModuleList(
            [INPExtractorBlock(self.dim, heads, mlp_ratio) for _ in range(config.extractor_depth)]
        )
        self.bottleneck = FeedForward(self.dim, hidden)
        self.decoder = nn.ModuleList([INPDecoderBlock(self.dim, heads, mlp_ratio) for _ in range(decoder_depth)])
        self.register_buffer("train_steps", torch.empty(0, dtype=torch.long))
        self.reset_parameters()

    def train(self, mode: bool = True) -> INPFormerModel:
        """Train mode for the trained parts only: the frozen encoder stays in eval mode (its BatchNorm
        statistics and drop-connect must not change while augmented images are encoded in training)."""
        super().train(mode)
        self.features.eval()
        return self

    def trainable(self) -> list[nn.Module]:
        return [self.extractor, self.bottleneck, self.decoder]

    def reset_parameters(self) -> None:
        """The paper's initialisation: linear weights truncated normal (std 0.01 within +-0.03), biases 0."""
        for part in self.trainable():
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def head_parameters(self) -> list[nn.Parameter]:
        """Every trained parameter (the encoder stays frozen)."""
        params = [self.inps]
        for part in self.trainable():
            params.extend(part.parameters())
        return params

    # -- pieces ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> the frozen encoder's levels side by side ``[B, sum C_l, h, w]``."""
        with torch.no_grad():
            return self.features(images)

    def _level(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        lo, hi = self.level_slices[i]
        return flat[:, lo:hi]

    def fused(self, flat: torch.Tensor) -> torch.Tensor:
        """Encoder levels ``[B, sum C_l, N]`` -> tokens ``[B, N, C]``: the levels side by side (concat) or averaged."""
        if self.fuse == "mean":
            flat = torch.stack([self._level(flat, i) for i in range(len(self.level_slices))]).mean(0)
        return flat.transpose(1, 2)

    def targets(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """What each group reconstructs ``[B, C_g, N]``: its levels side by side, or their mean."""
        out = []
        for group in self.level_groups:
            if self.fuse == "mean":
                out.append(torch.stack([self._level(flat, i) for i in group]).mean(0))
            else:
                out.append(flat[:, self.level_slices[group[0]][0] : self.level_slices[group[-1]][1]])
        return out

    def extract_inps(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image's INPs ``[B, M, C]`` from its own tokens ``[B, N, C]``."""
        inps = self.inps[None].expand(tokens.shape[0], -1, -1)
        for block in self.extractor:
            inps = block(inps, tokens)
        return inps

    def decode(self, tokens: torch.Tensor, inps: torch.Tensor) -> list[torch.Tensor]:
        """Bottleneck, then the INP-guided decoder; one reconstruction ``[B, C_g, N]`` per group."""
        x = self.bottleneck(tokens)
        outputs = []
        for block in self.decoder:
            x = block(x, inps)
            outputs.append(x)
        outputs.reverse()  # mirror order: the last decoder blocks reconstruct the shallowest group
        recon = []
        for run, group in zip(self.decoder_groups, self.level_groups):
            y = torch.stack([outputs[i] for i in run]).mean(0) if len(run) > 1 else outputs[run[0]]
            if self.fuse == "concat":
                y = y[..., self.level_slices[group[0]][0] : self.level_slices[group[-1]][1]]
            recon.append(y.transpose(1, 2))
        return recon

    def reconstruct(
        self, feats: torch.Tensor, locations: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Encoder levels ``[B, sum C_l, h, w]`` -> (targets, reconstructions, tokens, INPs).

        The INPs come from all ``N = h w`` tokens ``[B, N, C]``; targets and reconstructions (one
        ``[B, C_g, K]`` per group) are those of the token ``locations`` ``[B, K]``, all ``N`` if None.
        The decoder treats every token on its own, so a subset is the same computation on fewer tokens.
        """
        flat = feats.flatten(2)
        tokens = self.fused(flat)
        inps = self.extract_inps(tokens)
        queries = tokens
        if locations is not None:
            flat = flat.gather(2, locations[:, None, :].expand(-1, flat.shape[1], -1))
            queries = tokens.gather(1, locations[:, :, None].expand(-1, -1, tokens.shape[2]))
        return self.targets(flat), self.decode(queries, inps), tokens, inps

    def maps_from_features(self, feats: torch.Tensor, size: tuple[int, int], blur_sigma: float) -> torch.Tensor:
        """Summed per-group ``1 - cos`` maps, upsampled to ``size`` and smoothed: ``[B, *size]``."""
        b, _, h, w = feats.shape
        targets, recon, _, _ = self.reconstruct(feats)
        group_maps = [cosine_distance_maps(t, r).reshape(b, h, w) for t, r in zip(targets, recon)]
        maps = torch.stack([upsample_maps(m, size) for m in group_maps]).sum(0)
        return gaussian_blur(maps, blur_sigma)

    def forward(self, images: torch.Tensor, config: INPFormerConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps with the scoring-time settings ``blur_sigma`` and ``top_share`` of ``config``."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        maps = self.maps_from_features(self.encode(images), size, config.blur_sigma)
        return top_share_mean(maps, config.top_share), maps
