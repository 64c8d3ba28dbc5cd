"""ToCoAD (Liang et al., "Two-Stage Contrastive Learning for Industrial Anomaly Detection").

The pretrained backbone is fine-tuned to the product, then scored like PatchCore:

* Stage I (``stage1``): backbone frozen; a decoder over its levels (:class:`Discriminator`)
  learns to segment synthetic anomalies (:mod:`anomnet.synthesis`), focal loss with class
  weight ``alpha`` (``disc_loss=cross_entropy``: plain cross-entropy, in stage I and in ``L_neg``),
  Adam, learning rate times 0.2 at 80 % and 90 % of the steps.
* Stage II (``stage2``): discriminator fixed; one SimSiam head (projector, one-layer
  predictor) per level on the two deepest memory-bank levels. The first ``warmup`` share of the steps train
  the heads alone on the frozen backbone; then backbone and heads train on two augmented views
  of the good images, ``L = lambda L_sym + (1 - lambda) L_neg`` where ``L_neg`` is the fixed
  discriminator's focal loss on synthetic anomalies seen through the fine-tuned backbone. SGD,
  momentum 0.9, weight decay 1e-4; the backbone's learning rate ``lr2`` on a cosine schedule
  after the warm-up, the heads' ``head_lr`` constant. Without stage I there is no discriminator
  and ``L = L_sym``. BatchNorm statistics stay frozen (small CPU batches).
* Scoring: PatchCore's memory bank (greedy coreset, nearest-neighbour search) on the
  memory-bank layers of the fine-tuned backbone, with eq. 9's re-weighting applied to every
  patch (:class:`ToCoADModel`; ``reweight=image``: PatchCore's image-score-only re-weighting).

Training is bounded by step budgets (``stage1_steps``, ``stage2_steps``; old names ``steps1``, ``steps2``),
not the paper's 100 + 100 epochs. By default neither stage runs (``stage2=false``; ``stage1`` follows ``stage2``):
at these budgets stage II measured no better than the pretrained backbone (BENCHMARKS.md, section
``learned-stages``, part ``tocoad``), so the default is PatchCore's bank scored with eq. 9; ``stage2=true`` trains
both stages.
The saved model holds the fine-tuned backbone weights and the bank; neither the discriminator
nor the textures are needed to predict. Choices and measurements: docs/tocoad.md.
"""

from __future__ import annotations

import math
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
from anomnet.detectors.tocoad.losses import discriminator_loss
from anomnet.detectors.tocoad.model import ToCoADModel
from anomnet.detectors.tocoad.simsiam import SimSiamHead, multilevel_simsiam_loss
from anomnet.image_pool import describe_source
from anomnet.synthesis import CutPaste, PerlinAnomaly, load_textures, synthesize_batch
from anomnet.synthesis.base import AnomalyGenerator
from anomnet.training import PhaseRecord, parameter_snapshot, timed_phase, train_phase, weight_change


def default_decoder_layers(backbone: str, bank_layers: Sequence[str]) -> tuple[str, ...]:
    """Up to four backbone levels ending at the deepest memory-bank layer (the stem excluded)."""
    info = get_backbone_info(backbone)
    deepest = max(info.layers.index(n) for n in bank_layers)
    return tuple(n for n in info.layers[: deepest + 1] if n != "stem")[-4:]


@register
class ToCoAD(PatchCore):
    name = "tocoad"
    trains_backbone = True  # the fine-tuned weights travel with the model
    config_class = ToCoADConfig
    description = (
        "ToCoAD: synthetic anomalies, discriminator, SimSiam fine-tuning of the backbone, "
        "PatchCore memory bank (Liang et al.)"
    )
    config: ToCoADConfig
    model: ToCoADModel

    def __init__(self, config: ToCoADConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        info = get_backbone_info(c.backbone)
        bank = resolve_layers(info, c.layers)
        decoder = resolve_layers(info, c.decoder_layers or default_decoder_layers(c.backbone, bank))
        # stage II heads: the two deepest memory-bank levels unless head_layers names others
        heads = resolve_layers(info, c.head_layers) if c.head_layers else sorted(bank, key=info.layers.index)[-2:]
        self.trunk_layers = tuple(n for n in info.layers if n in set(bank) | set(decoder) | set(heads))
        self._bank_idx = [self.trunk_layers.index(n) for n in bank]
        self._dec_idx = [self.trunk_layers.index(n) for n in decoder]
        self._head_idx = [self.trunk_layers.index(n) for n in heads]
        self.model = ToCoADModel(self.model.features, c.num_neighbors, c.blur_sigma, c.reweight)

    # -- training ----------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        self.start_fit(train)
        c = self.config
        self.ensure_backbone()
        stage1 = c.stage2 if c.stage1 is None else c.stage1  # None: stage I runs with stage II (its only use)
        if (stage1 and c.stage1_steps) or (c.stage2 and c.stage2_steps):
            with timed_phase(self.fit_record, "load"):
                images = self._load_images(train, progress)
            trunk = create_backbone(c.backbone, self.trunk_layers, RANDOM_WEIGHTS)
            trunk.load_state_dict(self.features.backbone.state_dict())  # every level's weights, deeper ones too
            rng = torch.Generator().manual_seed(c.seed)
            generator = self._make_generator()
            disc = (
                self.train_discriminator(trunk, images, generator, rng, progress) if stage1 and c.stage1_steps else None
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
        probe = self._probe(trunk, images)
        opt = torch.optim.Adam(disc.parameters(), lr=c.lr1)
        steps = c.stage1_steps
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.8 * steps), int(0.9 * steps)], gamma=0.2)
        disc.train()
        size = (int(images.shape[-2]), int(images.shape[-1]))

        def step(_: int) -> dict[str, float]:
            x, masks = synthesize_batch(generator, self._batch(images, rng), rng, c.anomaly_prob)
            with torch.no_grad():
                levels = trunk(x)
            loss = discriminator_loss(self._decode(disc, levels, size), masks, c.disc_loss, c.focal_gamma, c.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return {c.disc_loss: float(loss.detach())}  # "focal" or "cross_entropy"

        phase = train_phase(self.fit_record, "stage1", step, steps, progress=progress)
        self._record_backbone_change(phase, trunk, images, probe)
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
        from anomnet.evaluation.metrics import image_auroc

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
        """Stage II: negative-guided contrastive fine-tuning of ``trunk`` (in place).

        One SimSiam head per level on the two deepest memory-bank levels. For the first
        ``warmup`` share of the steps only the heads train (the backbone frozen, run without gradients, no
        negative loss); then backbone and heads train together on ``lambda L_sym + (1 - lambda) L_neg``.
        """
        c = self.config
        lam = c.lambda_sym if disc is not None else 1.0
        channels = trunk.channels()
        head = SimSiamHead([channels[i] for i in self._head_idx], c.proj_dim, c.pred_dim)
        trunk.eval()  # BatchNorm keeps its ImageNet statistics; weights and affine parameters train
        probe = self._probe(trunk, images)
        backbone_params = list(trunk.parameters())
        opt = torch.optim.SGD(
            [{"params": backbone_params, "lr": c.lr2}, {"params": list(head.parameters()), "lr": c.head_lr}],
            lr=c.lr2, momentum=c.momentum, weight_decay=c.weight_decay,
        )  # fmt: skip
        steps = c.stage2_steps
        warmup = int(c.warmup * steps)  # the head warm-up, part of the budget
        joint = max(1, steps - warmup)

        def backbone_factor(i: int) -> float:  # 0 in the warm-up, then cosine from 1 to 0 over the joint steps
            return 0.0 if i < warmup else 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / joint))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [backbone_factor, lambda _: 1.0])
        head.train()
        size = (int(images.shape[-2]), int(images.shape[-1]))
        log: dict[str, list[float]] = {"sym": [], "neg": [], "backbone_grad": []}

        def step(i: int) -> dict[str, float]:
            warming = i < warmup
            for p in backbone_params:
                p.requires_grad_(not warming)
            x = self._batch(images, rng)
            v1 = torch.stack([two_view_augment(img, rng, c.crop_scale) for img in x])
            v2 = torch.stack([two_view_augment(img, rng, c.crop_scale) for img in x])
            with torch.set_grad_enabled(not warming):
                f1, f2 = trunk(v1), trunk(v2)
            l_sym = multilevel_simsiam_loss(
                head([f1[j] for j in self._head_idx]), head([f2[j] for j in self._head_idx])
            )
            loss = lam * l_sym
            losses = {"sym": float(l_sym.detach())}
            if disc is not None and lam < 1.0 and not warming:  # in the warm-up L_neg has nothing to train
                xa, masks = synthesize_batch(generator, x, rng, c.anomaly_prob)
                l_neg = discriminator_loss(
                    self._decode(disc, trunk(xa), size), masks, c.disc_loss, c.focal_gamma, c.alpha
                )
                loss = loss + (1.0 - lam) * l_neg
                losses["neg"] = float(l_neg.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not warming:
                log["backbone_grad"].append(_grad_norm(backbone_params))
            opt.step()
            sched.step()
            for key, value in losses.items():
                log[key].append(value)
            return {"total": float(loss.detach()), **losses}

        phase = train_phase(self.fit_record, "stage2", step, steps, progress=progress)
        phase.extra["lambda"] = lam
        phase.extra["warmup_steps"] = warmup
        phase.extra["levels"] = [self.trunk_layers[i] for i in self._head_idx]
        # the loss curve: the mean of each tenth of the steps (the harness keeps only first and last)
        phase.extra["curve"] = {k: _tenths(v) for k, v in log.items() if v}
        freeze(trunk)
        self._record_backbone_change(phase, trunk, images, probe)

    # -- what a phase did to the backbone (fit record) ---------------------------------------
    PROBE_IMAGES = 4  # the first training images, whose bank-level features are compared before / after

    def _bank_levels(self, trunk: FeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            levels = trunk(images[: self.PROBE_IMAGES])
        return [levels[i] for i in self._bank_idx]

    def _probe(
        self, trunk: FeatureExtractor, images: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The backbone's parameters and bank-level features on a few training images, before a phase."""
        return parameter_snapshot(trunk), self._bank_levels(trunk, images)

    def _record_backbone_change(
        self,
        phase: PhaseRecord,
        trunk: FeatureExtractor,
        images: torch.Tensor,
        probe: tuple[dict[str, torch.Tensor], list[torch.Tensor]],
    ) -> None:
        """``backbone_change``: the relative weight change over the phase (all parameters, and the parameter that
        moved most); ``feature_cosine``: per bank level, the mean cosine between the patch features before and after
        the phase on the first training images (1.0: the bank sees what the pretrained backbone saw)."""
        weights, before = probe
        after = self._bank_levels(trunk, images)  # the trunk is in eval mode after either stage
        phase.extra["backbone_change"] = weight_change(weights, trunk)
        phase.extra["feature_cosine"] = {
            self.trunk_layers[i]: float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())
            for i, a, b in zip(self._bank_idx, before, after, strict=True)
        }


def _grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0


def _tenths(values: Sequence[float], parts: int = 10) -> list[float]:
    """Means of ``parts`` consecutive, nearly equal slices of ``values`` (fewer when there are fewer values)."""
    n = len(values)
    bounds = [round(j * n / min(parts, n)) for j in range(min(parts, n) + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
