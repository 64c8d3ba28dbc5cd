"""INP-Former's fit (training inputs -> optional feature cache -> ``steps`` optimisation steps).

The encoder is frozen. Without augmentation (``flip`` off, ``scale_jitter`` 0) its features of
every training input are computed once and each step trains extractor, bottleneck and decoder on
a batch of them; with augmentation each step augments a batch of the training inputs (random
horizontal / vertical flips, one random zoom per batch) and encodes it afresh. The budget is
``epochs`` passes over the training inputs (at most ``max_steps`` steps). A step minimises
``L_sm + coherence_weight * L_c`` (:mod:`anomnet.detectors.inpformer.losses`) with StableAdamW
(or AdamW), a warm-up + cosine learning-rate schedule and gradient-norm clipping, through
:func:`anomnet.training.train_phase`. CPU budget: the INPs are extracted from all tokens, but only
``train_tokens`` random tokens per image go through bottleneck and decoder (which treat each token
on its own), and the trained network runs in bfloat16 autocast (``bf16``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anomnet.backbones import (
    FeatureExtractor,
    build_backbone,
    get_backbone_info,
)
from anomnet.backbones.vit import ViTExtractor
from anomnet.components import PatchFeatures
from anomnet.data import Sample
from anomnet.detectors.base import Detector, register
from anomnet.detectors.inpformer.config import INPFormerConfig
from anomnet.detectors.inpformer.losses import coherence_loss, soft_mining_loss
from anomnet.detectors.inpformer.model import INPFormerModel
from anomnet.detectors.inpformer.optim import make_optimizer, warm_cosine
from anomnet.errors import ConfigError
from anomnet.training import timed_phase, train_phase

CNN_GRID_STRIDE = 8


def default_layers(backbone: str) -> tuple[str, ...] | None:
    """INP-Former's levels when none are given: EfficientNet-Lite stage2-4 (strides 4-16, docs/inpformer.md),
    ResNet layer1-3; a ViT's own default (the paper's middle blocks)."""
    info = get_backbone_info(backbone)
    for wanted in (("stage2", "stage3", "stage4"), ("layer1", "layer2", "layer3")):
        if set(wanted) <= set(info.layers):
            return wanted
    return None


def grid_stride(config: INPFormerConfig, backbone: FeatureExtractor) -> int:
    """The token grid: ``grid_stride`` if set, else stride 8 for CNN levels and a ViT's own token grid."""
    if config.grid_stride is not None:
        return config.grid_stride
    return 0 if isinstance(backbone, ViTExtractor) else CNN_GRID_STRIDE


def augment(images: torch.Tensor, flip: bool, scale_jitter: float, gen: torch.Generator) -> torch.Tensor:
    """Random flips (each image, each axis, p = 0.5) and one random zoom per batch in ``[1 - j, 1 + j]``.

    A zoom in crops the centre of the enlarged batch; a zoom out mirrors the border to fill the square.
    """
    if flip:
        b = images.shape[0]
        h_flip = torch.rand(b, generator=gen) < 0.5
        v_flip = torch.rand(b, generator=gen) < 0.5
        images = torch.where(h_flip[:, None, None, None], images.flip(-1), images)
        images = torch.where(v_flip[:, None, None, None], images.flip(-2), images)
    if scale_jitter > 0:
        factor = 1.0 + (2.0 * float(torch.rand((), generator=gen)) - 1.0) * scale_jitter
        h, w = int(images.shape[-2]), int(images.shape[-1])
        nh, nw = max(2, round(h * factor)), max(2, round(w * factor))
        scaled = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1)
        if nh >= h and nw >= w:
            top, left = (nh - h) // 2, (nw - w) // 2
            images = scaled[..., top : top + h, left : left + w]
        else:
            pt, pl = (h - nh) // 2, (w - nw) // 2
            images = F.pad(scaled, (pl, w - nw - pl, pt, h - nh - pt), mode="reflect")
    return images


@register
class INPFormer(Detector):
    name = "inpformer"
    config_class = INPFormerConfig
    description = (
        "INP-Former: intrinsic normal prototypes of each image guide a decoder that reconstructs the "
        "encoder's features (Luo et al. 2025)"
    )
    config: INPFormerConfig
    model: INPFormerModel
    rescale_folds = True  # a fold model's fit can land on another score scale (docs/decisions.md)
    renamed_keys = {"net.": "", "backbone.": "features.backbone."}  # before the state lived in one module

    def __init__(self, config: INPFormerConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        features = self._build_features(None)
        self.model = INPFormerModel(features, c)

    def _build_features(self, weights: str | None, search: bool = False) -> PatchFeatures:
        c = self.config
        layers = c.layers if c.layers is not None else default_layers(c.backbone)
        backbone = build_backbone(c.backbone, layers, weights, search=search)
        stride = grid_stride(c, backbone)
        return PatchFeatures(backbone, c.patch_size, grid_stride=stride).eval()

    @property
    def features(self) -> PatchFeatures:
        return self.model.features

    # -- training ----------------------------------------------------------------------
    def _training_inputs(self, train: Sequence[Sample], progress: bool) -> torch.Tensor:
        parts = list(self.training_batches(train, "load" if progress else None))  # images, tiles, poses
        if not parts:
            raise ConfigError("INP-Former got no training inputs")
        return torch.cat(parts)

    def _encode_all(self, inputs: torch.Tensor) -> torch.Tensor:
        step = self.config.batch_size
        return torch.cat([self.model.encode(inputs[i : i + step]) for i in range(0, len(inputs), step)])

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        gen = self.start_fit(train)
        c = self.config
        if not self.features.backbone.ready:  # file-backed weights are read here, then travel inside the model
            self.model.features = self._build_features(c.weights, search=True)
        with torch.no_grad():  # seeded initial weights (start_fit seeded the global generator)
            self.model.inps.normal_()
            self.model.reset_parameters()
        augmenting = c.flip or c.scale_jitter > 0
        with timed_phase(self.fit_record, "load") as load:
            inputs = self._training_inputs(train, progress)
            cache = None if augmenting else self._encode_all(inputs)
            load.extra.update(inputs=len(inputs), cached_features=cache is not None)
        params = self.model.head_parameters()
        for p in params:
            p.requires_grad_(True)
        batch = min(c.train_batch_size, len(inputs))
        steps = self.step_budget(len(inputs))
        opt = make_optimizer(c.optimizer, params, c.lr, c.weight_decay)
        warmup = round(c.warmup * steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warm_cosine(s, steps, warmup))
        order: list[int] = []

        def next_batch() -> torch.Tensor:
            # shuffled passes over the inputs, as a data loader with drop_last
            nonlocal order
            if len(order) < batch:
                order = torch.randperm(len(inputs), generator=gen).tolist()
            idx, order = order[:batch], order[batch:]
            return torch.tensor(idx)

        self.model.train()

        def step(i: int) -> dict[str, float]:
            idx = next_batch()
            if cache is not None:
                feats = cache[idx]
            else:
                feats = self.model.encode(augment(inputs[idx], c.flip, c.scale_jitter, gen))
            n = feats.shape[-2] * feats.shape[-1]
            locations = None
            if 0 < c.train_tokens < n:
                locations = torch.rand(len(feats), n, generator=gen).argsort(1)[:, : c.train_tokens]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
                targets, recon, tokens, inps = self.model.reconstruct(feats, locations)
            mining = soft_mining_loss(targets, [r.float() for r in recon], c.mining_gamma)
            coherence, _ = coherence_loss(tokens.float(), inps.float())
            loss = mining + c.coherence_weight * coherence
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            opt.step()
            schedule.step()
            return {"loss": loss.item(), "mining": mining.item(), "coherence": coherence.item()}

        try:
            phase = train_phase(self.fit_record, "train", step, steps, progress=progress)
        finally:
            self.model.eval()
            for p in params:
                p.requires_grad_(False)
        phase.extra.update(
            batch=batch,
            epochs=round(steps * batch / len(inputs), 2),
            optimizer=c.optimizer,
            train_tokens=c.train_tokens,
            bf16=c.bf16,
            augment={"flip": c.flip, "scale_jitter": c.scale_jitter},
        )
        self.model.train_steps = torch.tensor([steps])

    def step_budget(self, inputs: int) -> int:
        """Optimisation steps for ``inputs`` training inputs: ``steps`` if set, else ``epochs`` passes of
        ``train_batch_size`` (at least one step), at most ``max_steps``."""
        c = self.config
        if c.steps > 0:
            return c.steps
        batch = min(c.train_batch_size, inputs)
        return max(1, min(c.max_steps, math.ceil(c.epochs * inputs / batch)))

    def fold_settings(self) -> dict[str, str]:
        """The final model's step count: a fold model on fewer images would take fewer steps by ``epochs``, and
        score on a different scale (docs/decisions.md: PIPED PA_BRG03_TL, 7 of 16 good images above every
        out-of-fold score)."""
        steps = self.model.train_steps
        return {"steps": str(int(steps[0]))} if self.config.steps == 0 and steps.numel() and steps[0] > 0 else {}

    # -- inference ---------------------------------------------------------------------
    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images, self.config)

    # -- persistence -------------------------------------------------------------------
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # folders written before the state lived in one module do not record the steps (-1: unknown)
        super().load_state_tensors({"train_steps": torch.tensor([-1]), **tensors})
