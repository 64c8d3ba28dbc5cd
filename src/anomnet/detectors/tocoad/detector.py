"""ToCoAD (Liang et al., "Two-Stage Contrastive Learning for Industrial Anomaly Detection").

The pretrained backbone is fine-tuned to the product, then scored like PatchCore:

* Stage I (``stage1``): backbone frozen; a decoder over its levels (:class:`Discriminator`)
  learns to segment synthetic anomalies (:mod:`anomnet.synthesis`), focal loss, Adam,
  learning rate times 0.2 at 80 % and 90 % of the steps.
* Stage II (``stage2``): discriminator fixed; backbone and a SimSiam head trained on two
  augmented views of the good images, ``L = lambda L_sym + (1 - lambda) L_neg`` where ``L_neg``
  is the fixed discriminator's focal loss on synthetic anomalies seen through the fine-tuned
  backbone. SGD, momentum 0.9, weight decay 1e-4, cosine schedule. Without stage I there is no
  discriminator and ``L = L_sym``. BatchNorm statistics stay frozen (small CPU batches).
* Scoring: PatchCore's memory bank (greedy coreset, nearest-neighbour search, re-weighted image
  score) on the memory-bank layers of the fine-tuned backbone (:class:`PatchCore` unchanged).

Training is bounded by step budgets (``stage1_steps``, ``stage2_steps``; old names ``steps1``, ``steps2``),
not the paper's 100 + 100 epochs.
The saved model holds the fine-tuned backbone weights and the bank; neither the discriminator
nor the textures are needed to predict. Choices and measurements: docs/tocoad.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anomnet.backbones import RANDOM_WEIGHTS, FeatureExtractor, create_backbone, get_backbone_info
from anomnet.backbones.base import freeze, resolve_layers
from anomnet.data import Sample
from anomnet.detectors.base import register
from anomnet.detectors.patchcore import PatchCore
from anomnet.detectors.tocoad.augment import two_view_augment
from anomnet.detectors.tocoad.config import ToCoADConfig
from anomnet.detectors.tocoad.discriminator import Discriminator
from anomnet.detectors.tocoad.losses import focal_loss
from anomnet.detectors.tocoad.simsiam import SimSiamHead, simsiam_loss
from anomnet.image_pool import describe_source
from anomnet.synthesis import CutPaste, PerlinAnomaly, load_textures, synthesize_batch
from anomnet.synthesis.base import AnomalyGenerator
from anomnet.training import timed_phase, train_phase


def default_decoder_layers(backbone: str, bank_layers: Sequence[str]) -> tuple[str, ...]:
    """Up to four backbone levels ending at the deepest memory-bank layer (the stem excluded)."""
    info = get_backbone_info(backbone)
    deepest = max(info.layers.index(n) for n in bank_layers)
    return tuple(n for n in info.layers[: deepest + 1] if n != "stem")[-4:]


@register
class ToCoAD(PatchCore):
    name = "tocoad"
    config_class = ToCoADConfig
    description = (
        "ToCoAD: synthetic anomalies, discriminator, SimSiam fine-tuning of the backbone, "
        "PatchCore memory bank (Liang et al.)"
    )
    config: ToCoADConfig

    def __init__(self, config: ToCoADConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        info = get_backbone_info(c.backbone)
        bank = resolve_layers(info, c.layers)
        decoder = resolve_layers(info, c.decoder_layers or default_decoder_layers(c.backbone, bank))
        self.trunk_layers = tuple(n for n in info.layers if n in set(bank) | set(decoder))
        self._bank_idx = [self.trunk_layers.index(n) for n in bank]
        self._dec_idx = [self.trunk_layers.index(n) for n in decoder]
        self._saves_backbone = True  # the fine-tuned weights travel with the model

    # -- training ----------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        self.start_fit(train)
        c = self.config
        self.ensure_backbone()
        if (c.stage1 and c.stage1_steps) or (c.stage2 and c.stage2_steps):
            with timed_phase(self.fit_record, "load"):
                images = self._load_images(train, progress)
            trunk = create_backbone(c.backbone, self.trunk_layers, RANDOM_WEIGHTS)
            trunk.load_state_dict(self.features.backbone.state_dict())
            rng = torch.Generator().manual_seed(c.seed)
            generator = self._make_generator()
            disc = (
                self.train_discriminator(trunk, images, generator, rng, progress)
                if c.stage1 and c.stage1_steps
                else None
            )
            if c.stage2 and c.stage2_steps:
                self.finetune(trunk, disc, images, generator, rng, progress)
                self.features.backbone.load_state_dict(trunk.state_dict())
            del images
        self.build_memory_bank(train, progress)

    def _load_images(self, train: Sequence[Sample], progress: bool) -> torch.Tensor:
        bar = "images" if progress else None
        batches = list(self.training_batches(train, bar))  # whole images resized, or tiles (anomnet.tiling)
        return torch.cat(batches)

    def _make_generator(self) -> AnomalyGenerator:
        c = self.config
        if c.generator == "cutpaste":
            return CutPaste(rotate=c.rotate, max_angle=c.max_angle)
        textures = load_textures(c.textures, c.texture_limit, c.seed, self.preprocess.output_size)
        self.fit_record.data_sources["textures"] = describe_source(c.textures, len(textures), c.texture_limit, c.seed)
        return PerlinAnomaly(textures, rotate=c.rotate, max_angle=c.max_angle)

    def _batch(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (self.config.train_batch_size,), generator=rng)
        return images[idx]

    def _decode(self, disc: Discriminator, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return disc([levels[i] for i in self._dec_idx], size)

    def train_discriminator(
        self,
        trunk: FeatureExtractor,
        images: torch.Tensor,
        generator: AnomalyGenerator,
        rng: torch.Generator,
        progress: bool,
    ) -> Discriminator:
        """Stage I: the decoder learns the synthetic masks on the frozen backbone's levels."""
        c = self.config
        freeze(trunk)
        channels = trunk.channels()
        disc = Discriminator([channels[i] for i in self._dec_idx])
        opt = torch.optim.Adam(disc.parameters(), lr=c.lr1)
        steps = c.stage1_steps
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.8 * steps), int(0.9 * steps)], gamma=0.2)
        disc.train()
        size = (int(images.shape[-2]), int(images.shape[-1]))

        def step(_: int) -> dict[str, float]:
            x, masks = synthesize_batch(generator, self._batch(images, rng), rng, c.anomaly_prob)
            with torch.no_grad():
                levels = trunk(x)
            loss = focal_loss(self._decode(disc, levels, size), masks, c.focal_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return {"focal": float(loss.detach())}

        phase = train_phase(self.fit_record, "stage1", step, steps, progress=progress)
        disc.eval()
        for p in disc.parameters():
            p.requires_grad_(False)
        phase.extra["synthetic_pixel_auroc"] = self._synthetic_auroc(trunk, disc, images, generator, rng)
        return disc

    def _synthetic_auroc(
        self,
        trunk: FeatureExtractor,
        disc: Discriminator,
        images: torch.Tensor,
        generator: AnomalyGenerator,
        rng: torch.Generator,
        batches: int = 4,
    ) -> float:
        """Pixel AUROC of the discriminator on fresh synthetic anomalies (a sanity figure for the notes)."""
        from anomnet.metrics import image_auroc

        scores, labels = [], []
        with torch.no_grad():
            for _ in range(batches):
                x, masks = synthesize_batch(generator, self._batch(images, rng), rng, 1.0)
                prob = torch.softmax(self._decode(disc, trunk(x), (int(x.shape[-2]), int(x.shape[-1]))), dim=1)[:, 1]
                scores.append(prob[:, ::4, ::4].flatten())
                labels.append(masks[:, ::4, ::4].flatten() > 0.5)
        return float(image_auroc(torch.cat(scores).numpy(), torch.cat(labels).numpy()))

    def finetune(
        self,
        trunk: FeatureExtractor,
        disc: Discriminator | None,
        images: torch.Tensor,
        generator: AnomalyGenerator,
        rng: torch.Generator,
        progress: bool,
    ) -> None:
        """Stage II: negative-guided contrastive fine-tuning of ``trunk`` (in place)."""
        c = self.config
        lam = c.lambda_sym if disc is not None else 1.0
        channels = trunk.channels()
        head = SimSiamHead(sum(channels[i] for i in self._bank_idx), c.proj_dim, c.pred_dim)
        trunk.eval()  # BatchNorm keeps its ImageNet statistics; weights and affine parameters train
        for p in trunk.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(
            [{"params": list(trunk.parameters())}, {"params": list(head.parameters())}],
            lr=c.lr2, momentum=c.momentum, weight_decay=c.weight_decay,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.stage2_steps)
        head.train()
        size = (int(images.shape[-2]), int(images.shape[-1]))

        def step(_: int) -> dict[str, float]:
            x = self._batch(images, rng)
            v1 = torch.stack([two_view_augment(img, rng, c.crop_scale) for img in x])
            v2 = torch.stack([two_view_augment(img, rng, c.crop_scale) for img in x])
            f1, f2 = trunk(v1), trunk(v2)
            z1, p1 = head([f1[i] for i in self._bank_idx])
            z2, p2 = head([f2[i] for i in self._bank_idx])
            l_sym = simsiam_loss(p1, p2, z1, z2)
            loss = lam * l_sym
            losses = {"sym": float(l_sym.detach())}
            if disc is not None and lam < 1.0:
                xa, masks = synthesize_batch(generator, x, rng, c.anomaly_prob)
                l_neg = focal_loss(self._decode(disc, trunk(xa), size), masks, c.focal_gamma)
                loss = loss + (1.0 - lam) * l_neg
                losses["neg"] = float(l_neg.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return {"total": float(loss.detach()), **losses}

        phase = train_phase(self.fit_record, "stage2", step, c.stage2_steps, progress=progress)
        phase.extra["lambda"] = lam
        freeze(trunk)
