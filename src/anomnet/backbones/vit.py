"""DINOv2 vision transformers (ViT-S/B/L, patch 14, optionally with 4 register tokens), in plain PyTorch.

The module names and parameter shapes are exactly those of the official DINOv2 release
(facebookresearch/dinov2, ``torch.hub`` entry points ``dinov2_vits14`` ... ``dinov2_vitl14_reg``):
``cls_token``, ``pos_embed`` (a 37 x 37 grid plus the class token: the released models were
trained at 518 px), ``register_tokens`` (the ``_reg`` models), ``mask_token``,
``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}`` and ``norm``. So a released file (``dinov2_vitb14_reg4_pretrain.pth``)
loads with strict key and shape checks; the weights are never shipped and never downloaded.

Layers are the outputs of the transformer blocks, ``block0`` ... ``block{depth-1}``, as patch-token
maps ``[B, D, h, w]`` (class and register tokens dropped, no final norm), all at stride 14. An
input whose sides are not multiples of 14 is first resized to the nearest multiples, so the token
grid covers the whole image; the positional embedding is interpolated (bicubic, as DINOv2) to
the token grid of any input size (bicubic, with the release's scale-factor rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomnet.backbones.base import (
    BackboneInfo,
    FeatureExtractor,
    FoldableBatchNorm2d,
    FoldableConv2d,
    find_weights_file,
    weights_dir,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
POS_GRID = 37  # the released DINOv2 models: 518 px / 14
POS_OFFSET = 0.1  # DINOv2's interpolate_offset
LAYER_NORM_EPS = 1e-6
VIT_IGNORED_PREFIXES = ("head.",)  # a classifier head, if a file carries one, is not used


@dataclass(frozen=True)
class ViTConfig:
    dim: int
    depth: int
    heads: int
    registers: int = 0
    params: str = ""

    @property
    def default_layers(self) -> tuple[str, ...]:
        """INP-Former's encoder layers: blocks 2-9 of 12 (ViT-S/B), every second of 4-18 of 24 (ViT-L)."""
        blocks = range(2, 10) if self.depth == 12 else range(4, 20, 2)
        return tuple(f"block{i}" for i in blocks)


_SIZES = {
    "s": ViTConfig(384, 12, 6, params="22M"),
    "b": ViTConfig(768, 12, 12, params="86M"),
    "l": ViTConfig(1024, 24, 16, params="300M"),
}
VIT_CONFIGS: dict[str, ViTConfig] = {}
for _size, _cfg in _SIZES.items():
    VIT_CONFIGS[f"dinov2_vit{_size}14"] = _cfg
    VIT_CONFIGS[f"dinov2_vit{_size}14_reg"] = ViTConfig(_cfg.dim, _cfg.depth, _cfg.heads, 4, _cfg.params)


def official_file_name(name: str) -> str:
    """The file name of the DINOv2 release: ``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth``."""
    base = name.removesuffix("_reg")
    return f"{base}_reg4_pretrain.pth" if name.endswith("_reg") else f"{base}_pretrain.pth"


def vit_info(name: str) -> BackboneInfo:
    cfg = VIT_CONFIGS[name]
    size = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14"}[cfg.dim]
    regs = " with 4 register tokens" if cfg.registers else ""
    return BackboneInfo(
        name=name,
        layers=tuple(f"block{i}" for i in range(cfg.depth)),
        default_layers=cfg.default_layers,
        needs_weights_file=True,
        description=(
            f"DINOv2 {size}{regs} ({cfg.params} params, official key names); weights file needed "
            f"({official_file_name(name)}); patch tokens of the chosen blocks at stride 14; "
            "ImageNet mean/std input normalization"
        ),
    )


def find_vit_weights(name: str) -> Path:
    """The weights folder's file for ``name``: the release's own file name first, then the usual patterns."""
    official = weights_dir() / official_file_name(name)
    if official.is_file():
        return official
    hint = (
        f"For {name} that is the DINOv2 release file {official_file_name(name)} (torch.hub "
        f"facebookresearch/dinov2 {name}), looked for under that name too. Without it, use the "
        "default backbone efficientnet_lite0, whose weights are installed."
    )
    return find_weights_file(name, hint)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (DINOv2's ``attn.qkv`` / ``attn.proj``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h * w, D]


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Tokens per side for an input of ``height x width``: the nearest whole number of patches (at least 1)."""
    return max(1, round(height / PATCH_SIZE)), max(1, round(width / PATCH_SIZE))


class ViTExtractor(FeatureExtractor):
    """DINOv2 ViT trunk returning the patch tokens of the selected blocks as ``[B, D, h, w]`` maps."""

    def __init__(self, name: str, layers: Sequence[str]) -> None:
        info = vit_info(name)
        super().__init__(info, layers, IMAGENET_MEAN, IMAGENET_STD)
        cfg = VIT_CONFIGS[name]
        self.config = cfg
        dim = cfg.dim
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, dim)) if cfg.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused here; part of the release's state dict
        self.blocks = nn.ModuleList([Block(dim, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)  # unused here (block outputs are taken raw)
        self._channels = {f"block{i}": dim for i in range(cfg.depth)}
        self._strides = {f"block{i}": PATCH_SIZE for i in range(cfg.depth)}
        self._wanted = {int(n.removeprefix("block")) for n in self.layers}
        self._run = max(self._wanted) + 1
        self._init_weights()

    def _init_weights(self) -> None:
        # only matters for weights="random" (tests): the scale of DINOv2's own initialisation
        for p in (self.pos_embed, self.cls_token, self.register_tokens):
            if p is not None and not p.is_meta:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and not m.weight.is_meta:
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale) and not m.gamma.is_meta:
                m.gamma.data.fill_(0.1)  # random tests: blocks visibly change the tokens

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """``[1, 1 + h * w, D]``: the class position and the patch grid interpolated (bicubic) to ``h x w``."""
        pos = self.pos_embed
        if (h, w) == (POS_GRID, POS_GRID):
            return pos
        dim = pos.shape[-1]
        grid = pos[:, 1:].float().reshape(1, POS_GRID, POS_GRID, dim).permute(0, 3, 1, 2)
        # the release's rule (kept there for its published numbers): the scale factor (n + 0.1) / 37,
        # which gives n outputs but maps coordinates slightly differently from size=(h, w)
        factors = ((h + POS_OFFSET) / POS_GRID, (w + POS_OFFSET) / POS_GRID)
        grid = F.interpolate(grid, scale_factor=factors, mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)
        return torch.cat([pos[:, :1], grid], dim=1)

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = token_grid(int(x.shape[-2]), int(x.shape[-1]))
        if (h * PATCH_SIZE, w * PATCH_SIZE) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h * PATCH_SIZE, w * PATCH_SIZE), mode="bilinear", align_corners=False)
        tokens = self.patch_embed(x)
        b = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self.position_embedding(h, w)
        extra = 1
        if self.register_tokens is not None:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
            extra += self.register_tokens.shape[1]
        out: dict[str, torch.Tensor] = {}
        for i in range(self._run):
            tokens = self.blocks[i](tokens)
            if i in self._wanted:
                patch = tokens[:, extra:]
                out[f"block{i}"] = patch.transpose(1, 2).reshape(b, -1, h, w)
        return out

    def _conv_bn_pairs(self) -> list[tuple[FoldableConv2d, FoldableBatchNorm2d]]:
        return []  # no BatchNorm to fold


def guess_vit(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the DINOv2-style ViT a (mismatching) state dict most likely belongs to."""
    if any(k.startswith(("teacher.", "student.")) for k in state):
        return "a DINOv2 training checkpoint (teacher/student); extract the backbone's state dict first"
    if any(k.split(".")[0] == "blocks" and len(k.split(".")) > 2 and k.split(".")[2].isdigit() for k in state):
        return "a DINOv2 model with chunked blocks (blocks.C.N.*); the release files use blocks.N.*"
    qkv = state.get("blocks.0.attn.qkv.weight")
    if qkv is None or qkv.ndim != 2:
        return None
    dim = int(qkv.shape[1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    regs = state.get("register_tokens")
    n_regs = int(regs.shape[1]) if regs is not None and regs.ndim == 3 else 0
    if any(".mlp.w12." in k for k in state):
        return f"a DINOv2 ViT with SwiGLU feed-forward (ViT-g: dim {dim}, {depth} blocks), not supported"
    for name, cfg in VIT_CONFIGS.items():
        if (cfg.dim, cfg.depth, cfg.registers) == (dim, depth, n_regs):
            return name
    patch = state.get("patch_embed.proj.weight")
    side = f", patch {int(patch.shape[-1])}" if patch is not None and patch.ndim == 4 else ""
    pos = state.get("pos_embed")
    grid = ""
    if pos is not None and pos.ndim == 3:
        n = int(pos.shape[1]) - 1
        grid = f", {int(math.isqrt(n))}x{int(math.isqrt(n))} position grid"
    return f"a ViT with dim {dim}, {depth} blocks, {n_regs} register tokens{side}{grid}"
