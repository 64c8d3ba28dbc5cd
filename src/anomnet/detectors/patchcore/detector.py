"""PatchCore's fit (features -> greedy coreset per chunk -> search index) and its saved tensors.

Features of two backbone levels are averaged over a 3x3 neighbourhood, brought to the finest
level's grid and concatenated (:class:`~anomnet.components.PatchFeatures`). A greedy k-center
coreset of the training patches forms the memory bank; a test patch scores its distance to the
nearest bank patch. The image score is the paper's re-weighted maximum; the map is upsampled and
Gaussian-smoothed (sigma 4).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch

from anomnet.backbones import build_backbone
from anomnet.components import PatchFeatures, faiss_available, greedy_coreset
from anomnet.data import Sample
from anomnet.detectors.base import Detector, register
from anomnet.detectors.patchcore.config import PatchCoreConfig
from anomnet.detectors.patchcore.model import PatchCoreModel
from anomnet.errors import ConfigError
from anomnet.training import PhaseRecord, timed_phase


@register
class PatchCore(Detector):
    name = "patchcore"
    renamed_keys = {"backbone.": "features.backbone."}  # before the state lived in one module
    can_leave_out = True
    config_class = PatchCoreConfig
    description = "PatchCore: coreset memory bank of pretrained patch features (Roth et al. 2022)"
    config: PatchCoreConfig
    model: PatchCoreModel

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.model = PatchCoreModel(self._build_features(None), c.num_neighbors, c.blur_sigma)

    def _build_features(self, weights: str | None, search: bool = False) -> PatchFeatures:
        c = self.config
        backbone = build_backbone(c.backbone, c.layers, weights, search=search)
        return PatchFeatures(backbone, c.patch_size, grid_stride=0, embed_dim=c.embed_dim).eval()

    @property
    def features(self) -> PatchFeatures:
        return self.model.features

    @property
    def memory_bank(self) -> torch.Tensor:
        return self.model.memory_bank

    # -- training ----------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> patch features ``[B, h, w, D]``."""
        return self.model.extract(images)

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        self.start_fit(train)
        self.ensure_backbone()
        self.build_memory_bank(train, progress)

    def ensure_backbone(self) -> None:
        """Give a file-backed backbone its weights (``weights`` setting or the weights folder) before fit."""
        if not self.features.backbone.ready:
            self.model.features = self._build_features(self.config.weights, search=True)

    def build_memory_bank(
        self,
        train: Sequence[Sample],
        progress: bool = True,
        extract: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Coreset memory bank and search index of the patch features of ``train``.

        ``extract`` maps preprocessed images to patch features ``[B, h, w, D]``; the default is
        :meth:`extract` (this detector's backbone levels), any other feature extractor works.
        Records the phases ``features``, ``coreset`` and ``index`` in ``fit_record``.
        """
        extract = extract or self.extract
        chunk = self.config.coreset_chunk
        buf: torch.Tensor | None = None
        owner_buf = torch.empty(0, dtype=torch.int32)
        filled = 0
        kept: list[torch.Tensor] = []
        kept_owner: list[torch.Tensor] = []
        bar = "features" if progress else None
        t_features = t_coreset = 0.0
        owners = self.input_owners(train)
        total, ratio = 0, self.config.coreset_ratio
        clock = time.perf_counter()
        for images in self.training_batches(train, bar):  # whole images, or tiles
            f = extract(images)
            o = owners.next_batch(int(images.shape[0])).repeat_interleave(f.shape[1] * f.shape[2])
            f = f.reshape(-1, f.shape[-1])
            while f.shape[0]:
                if buf is None:  # allocated once: patches per image are fixed by the input size
                    per_image = f.shape[0] // images.shape[0]
                    total = per_image * self.training_count(train)
                    ratio = self.coreset_share(total)
                    buf = torch.empty(min(chunk, total), f.shape[1])
                    owner_buf = torch.empty(buf.shape[0], dtype=torch.int32)
                take = min(buf.shape[0] - filled, f.shape[0])
                buf[filled : filled + take] = f[:take]
                owner_buf[filled : filled + take] = o[:take]
                filled, f, o = filled + take, f[take:], o[take:]
                if filled == buf.shape[0]:
                    now = time.perf_counter()
                    t_features += now - clock
                    idx = self._subsample(buf[:filled], ratio, progress)
                    kept.append(buf[idx].clone())
                    kept_owner.append(owner_buf[idx].clone())
                    clock = time.perf_counter()
                    t_coreset += clock - now
                    filled = 0
        now = time.perf_counter()
        t_features += now - clock
        if buf is None:
            raise ConfigError("PatchCore got no training inputs")
        if filled:
            idx = self._subsample(buf[:filled], ratio, progress)
            kept.append(buf[idx].clone())
            kept_owner.append(owner_buf[idx].clone())
        t_coreset += time.perf_counter() - now
        del buf
        self.fit_record.phases.append(PhaseRecord(name="features", seconds=t_features))
        self.fit_record.phases.append(
            PhaseRecord(name="coreset", seconds=t_coreset, extra={"patches": total, "ratio": ratio})
        )
        bank = torch.cat(kept) if len(kept) > 1 else kept[0]
        with timed_phase(self.fit_record, "index", patches=int(bank.shape[0])):
            self.model.set_bank(bank, self.config.nn_backend, self.config.nn_probe)
        self.model.bank_owner = torch.cat(kept_owner) if owners.complete() else None

    def coreset_share(self, patches: int) -> float:
        """The share of the training patches the bank keeps: ``coreset_ratio``, lowered so that at most
        ``coreset_max`` of ``patches`` are kept when that is set."""
        c = self.config
        if c.coreset_max and c.coreset_ratio * patches > c.coreset_max:
            return c.coreset_max / patches
        return c.coreset_ratio

    def _subsample(self, features: torch.Tensor, ratio: float, progress: bool) -> torch.Tensor:
        """Row indices of the coreset of one chunk of patch features, ``ratio`` of its rows."""
        c = self.config
        count = max(1, int(round(ratio * features.shape[0])))
        return greedy_coreset(features, count, c.coreset_projection, c.seed, progress=progress)

    # -- leave-one-image-out -------------------------------------------------------------
    @property
    def supports_leave_out(self) -> bool:
        """True when the bank records which training image each patch came from."""
        return self.model.bank_owner is not None

    def leave_out(self, images: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """Predict, within the block, as if the training images at the positions ``images`` were not in the bank."""
        return self.model.leave_out(images)

    # -- inference ---------------------------------------------------------------------
    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images)

    # -- persistence -------------------------------------------------------------------
    def state_loaded(self) -> None:
        """The search index of the loaded bank: the saved IVF cells, or an exact index."""
        m, c = self.model, self.config
        backend = c.nn_backend
        if backend == "auto":  # search the way the fitted model did: IVF cells saved, or an exact index
            backend = "ivf" if m.nn_centroids is not None else ("faiss" if faiss_available() else "exact")
        if m.bank_owner is not None and m.bank_owner.shape != (m.memory_bank.shape[0],):
            raise ConfigError(
                f"bank_owner has shape {tuple(m.bank_owner.shape)}, the bank {m.memory_bank.shape[0]} rows"
            )
        m.set_bank(m.memory_bank, backend, c.nn_probe, m.nn_centroids)
