"""CPR's fit (features -> codebook and histograms -> foreground -> head training -> bank).

1. ``features``: every training input (whole images or tiles, with their turned poses; see
   :meth:`Detector.training_batches`) is kept as 8-bit pixels, and its descriptor level (the
   finest backbone level) as features.
2. ``global_retrieval``: k-means codebook of the descriptor locations, block histograms of
   every training input, and each input's ``k_images`` nearest other inputs (its training
   references).
3. ``foreground``: the unsupervised foreground discriminant and the training inputs' weights;
   with ``foreground=auto`` it is used only where the fit finds an object on a background.
4. ``train``: the retrieval head learns, on the frozen backbone, that a normal pixel matches
   the same place of a retrieved reference and a pasted defect does not (``losses``). Defects:
   :class:`~anomnet.synthesis.defects.RealisticDefects` (drawn spots, cracks, scratches, or the
   crops of the ``defects`` folder), centred on the foreground when it is used; with ``augment``
   the reference code's salt-and-pepper and lightness changes (``augment``). AdamW as the paper,
   ``steps`` steps of ``train_batch_size`` pairs (optionally cut by ``time_budget_s``).
5. ``bank``: the head's L2-normalised features of every training input, per level; with
   ``bank_inputs`` only of that many inputs (a greedy k-center choice on their block histograms,
   the space the global retrieval searches), so the stored banks stay bounded with tiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from anomnet import imageio
from anomnet.backbones import build_backbone
from anomnet.components import greedy_coreset, kmeans
from anomnet.data import Sample
from anomnet.detectors.base import Detector, register
from anomnet.detectors.cpr.augment import reference_augment
from anomnet.detectors.cpr.config import CPRConfig
from anomnet.detectors.cpr.head import RetrievalHead
from anomnet.detectors.cpr.losses import distance_weights, features_at, retrieval_loss
from anomnet.detectors.cpr.model import CPRModel, default_layers
from anomnet.detectors.cpr.pairs import PointPairs, sample_pairs
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.synthesis.defect_crops import load_defect_crops
from anomnet.synthesis.defects import RealisticDefects
from anomnet.training import timed_phase, train_phase
from anomnet.transforms import upsample_maps

CODEBOOK_SAMPLES = 50_000  # descriptor locations the k-means codebook is fitted on


@register
class CPR(Detector):
    name = "cpr"
    # tensor names before the state lived in one module
    renamed_keys = {"codebook": "retrieval.codebook", "refs": "retrieval.refs", "bank.": "bank"}
    can_leave_out = True
    config_class = CPRConfig
    description = (
        "CPR: cascade patch retrieval (global image retrieval, windowed local retrieval, foreground "
        "estimation), retrieval head trained on pasted real-looking defects (Li et al. 2024)"
    )
    config: CPRConfig
    model: CPRModel

    def __init__(self, config: CPRConfig | None = None) -> None:
        super().__init__(config)
        self._build(self.config.layers if self.config.layers is not None else default_layers(self.config.backbone))

    def _build(self, layers: tuple[str, ...] | None) -> None:
        c = self.config
        self.layers = layers
        backbone = build_backbone(c.backbone, self.layers)
        if len(backbone.layers) != len(c.windows):
            raise ConfigError(
                f"CPR uses the levels {', '.join(backbone.layers)}: give one window per level "
                f"(setting windows, now {','.join(map(str, c.windows))})"
            )
        self.model = CPRModel(backbone, c)

    # -- training ----------------------------------------------------------------------
    def ensure_backbone(self) -> None:
        """Give a file-backed backbone its weights (``weights`` setting or the weights folder) before fit."""
        if not self.model.backbone.ready:
            self.model.backbone = build_backbone(self.config.backbone, self.layers, self.config.weights, search=True)

    def _choose_levels(self, train: Sequence[Sample]) -> None:
        """With no ``layers`` given: the finer pair when the training images are smaller than the input (they
        are upsampled), the paper's otherwise; written into the settings, so the saved model keeps them."""
        c = self.config
        if c.layers is not None:
            return
        with timed_phase(self.fit_record, "levels") as phase:
            native = c.tile  # a tile is what is resized to the input; else the median image's short side
            if native <= 0:
                sides = sorted(min(imageio.image_size(s.path)) for s in train[:: max(1, len(train) // 16)])
                native = sides[len(sides) // 2]
            layers = default_layers(c.backbone, upsampled=native < c.image_size)
            if layers is not None and layers != self.layers:
                self._build(layers)
            if self.layers is not None:
                self.config = dataclasses.replace(c, layers=self.layers)
            phase.extra.update(layers=list(self.layers or ()), image_side=int(native), input_side=c.image_size)

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        gen = self.start_fit(train)
        self._choose_levels(train)
        c = self.config
        self.ensure_backbone()
        generator = self._defect_generator()  # a bad defect folder fails before any long work
        backbone = self.model.backbone
        # seeded init
        self.model.head = RetrievalHead(backbone.channels(), c.head_width, c.head_dim, c.head_block).eval()
        with timed_phase(self.fit_record, "features") as phase:
            images, desc = self._cache(train, progress)
            phase.extra["inputs"] = len(images)
        with timed_phase(self.fit_record, "global_retrieval") as phase:
            neighbours = self._fit_retrieval(desc, gen)
            phase.extra["references_per_input"] = int(neighbours.shape[1])
        with timed_phase(self.fit_record, "foreground") as phase:
            found = self.model.foreground.fit(desc, gen)
            self.model.train_foreground = self.model.foreground(desc) if found.fitted else None
            phase.extra.update(dataclasses.asdict(found))
            phase.extra["used"] = self.model.uses_foreground(self.config.foreground)
        del desc  # the largest fit-time tensor after the bank; not needed from here on
        self._train(images, neighbours, generator, gen, progress)
        with timed_phase(self.fit_record, "bank") as phase:
            kept = self.reference_inputs()
            self.model.keep_inputs(kept)
            self.model.banks = self._bank(images, kept)
            phase.extra.update(inputs=len(images), kept=len(kept))

    def _cache(self, train: Sequence[Sample], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs as 8-bit pixels ``[N, 3, S, S]`` and their descriptor level ``[N, d, h, w]``.

        Both are filled in place (no list joined at the end, which held everything twice); the descriptors
        are stored channels-last, so the fit's per-location views (codebook, foreground) need no copy."""
        n = self.training_count(train)
        pixels = desc = torch.empty(0)
        owners, owner, filled = self.input_owners(train), [], 0
        with torch.inference_mode():
            for images in self.training_batches(train, "features" if progress else None):
                b = int(images.shape[0])
                if filled + b > n:
                    raise ConfigError(
                        f"CPR expected {n} training inputs and got more (did an image change during the fit?)"
                    )
                level = self.model.levels(images)[self.model.desc_level]
                if not filled:
                    pixels = torch.empty(n, *images.shape[1:], dtype=torch.uint8)
                    d, h, w = level.shape[1:]
                    desc = torch.empty(n, h, w, d, dtype=level.dtype).permute(0, 3, 1, 2)
                pixels[filled : filled + b] = (images * 255.0).round().clamp(0, 255)
                desc[filled : filled + b] = level
                owner.append(owners.next_batch(b))
                filled += b
        if not filled:
            raise ConfigError("CPR got no training inputs")
        self.model.input_owner = torch.cat(owner) if owners.complete() else None
        return pixels[:filled], desc[:filled]

    def _fit_retrieval(self, desc: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Codebook and histograms of the training inputs; returns each input's nearest other inputs ``[N, k]``."""
        c = self.config
        n, d = desc.shape[:2]
        flat = desc.permute(0, 2, 3, 1).reshape(-1, d)
        sample = flat[torch.randperm(len(flat), generator=gen)[:CODEBOOK_SAMPLES]]
        retrieval = self.model.retrieval
        retrieval.set_codebook(kmeans(sample, min(c.clusters, len(sample)), gen, iterations=10))
        refs = torch.cat([retrieval.histograms(chunk) for chunk in desc.split(64)])
        retrieval.set_refs(refs)
        if n == 1:
            return torch.zeros(1, 1, dtype=torch.long)
        k = min(c.k_images, n - 1)
        rows = []
        for start in range(0, n, 64):
            dist = retrieval.distances(refs[start : start + 64])
            own = torch.arange(start, min(n, start + 64))
            dist[torch.arange(len(own)), own] = float("inf")  # never its own reference
            rows.append(dist.topk(k, dim=1, largest=False).indices)
        return torch.cat(rows)

    def _defect_generator(self) -> RealisticDefects:
        c = self.config
        crops = load_defect_crops(c.defects, seed=c.seed) if c.defects else None
        if crops:
            self.fit_record.data_sources["defects"] = f"{c.defects} ({len(crops)} crops)"
        else:
            self.fit_record.data_sources["defects"] = f"drawn: {', '.join(c.defect_kinds)}"
        return RealisticDefects(kinds=c.defect_kinds, crops=crops)

    def _train(
        self,
        images: torch.Tensor,
        neighbours: torch.Tensor,
        generator: RealisticDefects,
        gen: torch.Generator,
        progress: bool,
    ) -> None:
        c = self.config
        head, backbone = self.model.head, self.model.backbone
        side = min(int(images.shape[-2]), int(images.shape[-1]))
        crop = side if c.train_crop <= 0 else min(c.train_crop, side)  # pairs train on aligned crops
        use_fg = self.model.uses_foreground(c.foreground) and self.model.train_foreground is not None
        min_shift = self.negative_shift()
        opt = torch.optim.AdamW(head.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        for p in head.parameters():
            p.requires_grad_(True)
        head.train()

        def step(_: int) -> dict[str, float]:
            query, reference, masks, weights = self._pairs(images, neighbours, generator, gen, crop, use_fg)
            with torch.no_grad():
                lq, lr_ = backbone(query), backbone(reference)
            pos, anomalous, neg = sample_pairs(masks, weights, c.points, gen, negatives=use_fg, min_shift=min_shift)
            grid = (crop, crop)
            fq, fr = head(lq), head(lr_)
            l_pos = l_neg = torch.zeros(())
            for level in range(len(fq)):
                negatives = anomalous
                if neg is not None:  # hard negatives weighted by how different the frozen features are
                    w = distance_weights(
                        features_at(lq[level], neg.query, grid),
                        features_at(lr_[level], neg.reference, grid),
                        neg.weight,
                    )
                    negatives = PointPairs.cat(PointPairs(neg.query, neg.reference, w), anomalous)
                a, b = retrieval_loss(
                    fq[level],
                    fr[level],
                    (pos.query, pos.reference, pos.weight),
                    (negatives.query, negatives.reference, negatives.weight),
                    grid,
                    c.pos_margin,
                    c.neg_margin,
                    c.loss_power,
                )
                l_pos, l_neg = l_pos + a, l_neg + b
            loss = l_pos + l_neg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": float(loss.detach()), "pos": float(l_pos.detach()), "neg": float(l_neg.detach())}

        budget = c.time_budget_s if c.time_budget_s > 0 else None
        phase = train_phase(self.fit_record, "train", step, c.steps, time_budget_s=budget, progress=progress)
        phase.extra["foreground_used"] = use_fg
        phase.extra["crop"] = crop
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        self.model.refresh()

    def negative_shift(self) -> float:
        """Pixels two places of a negative pair are further apart than (setting ``negative_shift``): by
        default further than the finest level's window reaches; the reference code's half of that."""
        level = self.model.desc_level
        reach = self.config.windows[level] // 2 + (1 if self.config.negative_shift == "outside_window" else 0)
        return float(self.model.backbone.strides()[level] * reach * 2**0.5)

    def _pairs(
        self,
        images: torch.Tensor,
        neighbours: torch.Tensor,
        generator: RealisticDefects,
        gen: torch.Generator,
        crop: int,
        use_fg: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One batch of training pairs, cut to the same ``crop`` window: (queries with pasted defects,
        their retrieved references, the defect masks, the sharpened foreground weights or None).

        Defects are drawn on the whole input (so their size is relative to it), centred inside the
        window (and on the foreground when it is used)."""
        c = self.config
        idx = torch.randint(len(images), (c.train_batch_size,), generator=gen)
        ref = neighbours[idx, torch.randint(neighbours.shape[1], (len(idx),), generator=gen)]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        top, left = (int(torch.randint(s - crop + 1, (), generator=gen)) for s in size)
        rows, cols = slice(top, top + crop), slice(left, left + crop)
        query, reference = images[idx].float() / 255.0, images[ref][..., rows, cols].float() / 255.0
        allowed = torch.zeros(len(idx), *size, dtype=torch.bool)
        allowed[:, rows, cols] = True
        weights = None
        fg = self.model.train_foreground
        if use_fg and fg is not None:
            fg_query, fg_ref = upsample_maps(fg[idx].float(), size), upsample_maps(fg[ref].float(), size)
            allowed &= fg_query > 0.5
            weights = torch.sigmoid(10.0 * torch.maximum(fg_query, fg_ref)[..., rows, cols] - 5.0)  # sharpened
        masks = torch.zeros(len(idx), *size)
        for i in range(len(idx)):
            if float(torch.rand((), generator=gen)) < c.anomaly_prob:
                query[i], masks[i] = generator.paste(query[i], gen, allowed[i])
        query = query[..., rows, cols].contiguous()
        if c.augment:  # each image on its own, after the defect (as the reference code)
            query, reference = reference_augment(query, gen), reference_augment(reference, gen)
        return query, reference.contiguous(), masks[..., rows, cols], weights

    def reference_inputs(self) -> torch.Tensor:
        """Sorted indices of the training inputs kept as references: all (``bank_inputs`` 0 or at least their
        number), else ``bank_inputs`` of them chosen by greedy k-center on the retrieval histograms (``seed``)."""
        refs = self.model.retrieval.refs
        n, count = int(refs.shape[0]), self.config.bank_inputs
        if count <= 0 or count >= n:
            return torch.arange(n)
        return greedy_coreset(refs.reshape(n, -1), count, seed=self.config.seed).sort().values

    @torch.inference_mode()
    def _bank(self, images: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per level the features ``[len(rows), dim, h, w]`` of the inputs ``rows``, filled in place (no copy)."""
        dtype = torch.float16 if self.config.bank_dtype == "float16" else torch.float32
        banks: list[torch.Tensor] = []
        for start in range(0, len(rows), self.config.batch_size):
            chunk = images[rows[start : start + self.config.batch_size]]
            feats = self.model.features(self.model.levels(chunk.float() / 255.0))
            if not banks:
                banks = [torch.empty(len(rows), *f.shape[1:], dtype=dtype) for f in feats]
            for bank, f in zip(banks, feats):
                bank[start : start + len(chunk)] = f
        return banks

    # -- leave-one-image-out -------------------------------------------------------------
    @property
    def supports_leave_out(self) -> bool:
        """True when the model records which training image each bank row came from."""
        return self.model.input_owner is not None

    def leave_out(self, images: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Predict, within the block, as if the training images at the positions ``images`` were not in the
        banks and the retrieval set (the head stays as trained: it saw them)."""
        return self.model.leave_out(images)

    # -- inference ---------------------------------------------------------------------
    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return self.model(images, self.config)

    # -- persistence -------------------------------------------------------------------
    def state_loaded(self) -> None:
        m = self.model
        m.refresh()
        if m.input_owner is not None and m.input_owner.shape != (m.banks[0].shape[0],):
            raise ModelFormatError(
                f"input_owner has shape {tuple(m.input_owner.shape)}, the banks {m.banks[0].shape[0]} rows"
            )
