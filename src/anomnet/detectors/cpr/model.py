"""The module CPR predicts with: backbone levels -> global retrieval -> windowed local retrieval -> map.

``forward`` is plain torch on tensors (no numpy, no search index): the only Python loops run
over the levels, the ``k`` retrieved images and the window offsets, so it can be traced for
export. The scoring-time settings (``k_images``, ``windows``, ``foreground``, ``blur_sigma``,
``top_share``) are read from the config each call is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from anomnet.backbones import FeatureExtractor, get_backbone_info
from anomnet.components import gaussian_blur
from anomnet.components.score_reduction import top_share_mean
from anomnet.detectors.cpr.config import CPRConfig
from anomnet.detectors.cpr.foreground import ForegroundBranch
from anomnet.detectors.cpr.head import RetrievalHead
from anomnet.detectors.cpr.retrieval import GlobalRetrieval, window_distances
from anomnet.errors import ConfigError, NotFittedError
from anomnet.transforms import upsample_maps


def default_layers(backbone: str, upsampled: bool = False) -> tuple[str, ...] | None:
    """CPR's levels when none are given: strides 4 and 8, as the paper (DenseNet blocks 1 and 2); for
    training images smaller than the input (upsampled to it) EfficientNet-Lite's strides 2 and 4, which
    were better on PIPED's 128 px images at 256 px input and worse on bottle's 900 px ones (docs/cpr.md)."""
    info = get_backbone_info(backbone)
    pairs = [("stage2", "stage3"), ("layer1", "layer2")]
    if upsampled:
        pairs.insert(0, ("stage1", "stage2"))
    for wanted in pairs:
        if set(wanted) <= set(info.layers):
            return wanted
    return None  # the backbone's own default


class CPRModel(nn.Module):
    """Images ``[B, 3, S, S]`` -> (scores ``[B]``, anomaly maps ``[B, S, S]``).

    Buffers filled by fit: ``bank0``, ``bank1``, ... (:attr:`banks`), the retrieval's codebook and
    histograms, the foreground discriminant; ``train_foreground`` ``[N, h, w]`` (the training
    inputs' foreground at the descriptor level) and ``input_owner`` ``[N]`` (the training image of
    each input, for leave-one-image-out) are None when the fit found no foreground / owners.
    """

    train_foreground: torch.Tensor | None
    input_owner: torch.Tensor | None
    scoring_head: RetrievalHead  # see refresh()

    def __init__(self, backbone: FeatureExtractor, config: CPRConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = RetrievalHead(backbone.channels(), config.head_width, config.head_dim, config.head_block)
        self.refresh()
        self.retrieval = GlobalRetrieval(config.blocks, config.block_share)
        self.foreground = ForegroundBranch()
        strides = backbone.strides()
        self.desc_level = min(range(len(strides)), key=lambda i: strides[i])  # the finest level
        for i in range(len(strides)):  # per level [N, dim, h_l, w_l], L2-normalised
            self.register_buffer(f"bank{i}", torch.empty(0))
        self.register_buffer("train_foreground", None)
        self.register_buffer("input_owner", None)
        self.batch_chunk = 1  # images per local-retrieval pass (retrieval.window_distances; large: one batched pass)

    @property
    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank{i}") for i in range(len(self.head.levels))]

    @banks.setter
    def banks(self, banks: Sequence[torch.Tensor]) -> None:
        for i, bank in enumerate(banks):
            setattr(self, f"bank{i}", bank)

    @contextlib.contextmanager
    def leave_out(self, owners: Sequence[int]) -> Iterator[None]:
        """Within the block the inputs of the training images ``owners`` are neither retrieved nor searched:
        their rows of the banks, the retrieval histograms and the training foregrounds are left out."""
        if self.input_owner is None:
            raise ConfigError("this model does not record which training image each bank row came from")
        keep = ~torch.isin(self.input_owner, torch.as_tensor(list(owners), dtype=self.input_owner.dtype))
        if not bool(keep.any()):
            raise ConfigError("leaving these training images out leaves no bank to search")
        saved = (self.banks, self.retrieval.refs, self.train_foreground)
        self.banks = [bank[keep] for bank in saved[0]]
        self.retrieval.refs = saved[1][keep]
        self.train_foreground = None if saved[2] is None else saved[2][keep]
        try:
            yield
        finally:
            self.banks, self.retrieval.refs, self.train_foreground = saved

    def keep_inputs(self, rows: torch.Tensor) -> None:
        """Keep only the training inputs ``rows`` as references: their bank rows (where filled), retrieval
        histograms, training foregrounds and owners."""
        if self.banks[0].numel():
            self.banks = [bank[rows].contiguous() for bank in self.banks]
        self.retrieval.refs = self.retrieval.refs[rows].contiguous()
        if self.train_foreground is not None:
            self.train_foreground = self.train_foreground[rows].contiguous()
        if self.input_owner is not None:
            self.input_owner = self.input_owner[rows].contiguous()

    def refresh(self) -> None:
        """Rebuild the fused scoring head after the head's weights changed (fit, load). Prediction uses this
        fused copy of the trained form (BatchNorm); derived from ``head``, it is not a submodule (not saved)."""
        object.__setattr__(self, "scoring_head", self.head.fused())

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(images))

    def features(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The scoring head's L2-normalised retrieval features of each level."""
        return self.scoring_head(levels)

    def uses_foreground(self, mode: str) -> bool:
        """Whether the foreground weights the map: setting ``foreground`` "on", or "auto" on objects."""
        return mode == "on" or (mode == "auto" and self.foreground.object_like)

    def raw_maps(self, levels: Sequence[torch.Tensor], index: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
        """``[B, h, w]`` at the finest level: per level the windowed distances, upsampled, summed."""
        feats = self.features(levels)
        size = (int(feats[self.desc_level].shape[-2]), int(feats[self.desc_level].shape[-1]))
        total = torch.zeros(feats[0].shape[0], *size, dtype=feats[0].dtype, device=feats[0].device)
        for f, bank, window in zip(feats, self.banks, windows):
            total = total + upsample_maps(window_distances(f, bank, index, window, self.batch_chunk), size)
        return total

    def foreground_weights(self, desc: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]``: the larger of the image's own foreground estimate and its retrieved images' ones."""
        own = self.foreground(desc)
        if self.train_foreground is None:
            return own
        return torch.maximum(own, self.train_foreground[index].to(own.dtype).amax(1))

    def forward(self, images: torch.Tensor, config: CPRConfig) -> tuple[torch.Tensor, torch.Tensor]:
        if len(config.windows) != len(self.banks):
            raise NotFittedError(f"CPR has {len(self.banks)} levels but {len(config.windows)} windows")
        size = (int(images.shape[-2]), int(images.shape[-1]))
        levels = self.levels(images)
        desc = levels[self.desc_level]
        index = self.retrieval.retrieve(desc, config.k_images)
        maps = upsample_maps(self.raw_maps(levels, index, config.windows), size)
        if self.uses_foreground(config.foreground):
            maps = maps * upsample_maps(self.foreground_weights(desc, index), size)
        maps = gaussian_blur(maps, config.blur_sigma)
        return top_share_mean(maps, config.top_share), maps
