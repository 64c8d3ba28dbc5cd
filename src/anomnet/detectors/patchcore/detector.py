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

from anomnet.backbones import backbone_state, build_backbone, get_backbone_info, load_backbone_state
from anomnet.components import PatchFeatures, faiss_available, greedy_coreset
from anomnet.components.nn_search import NearestNeighbors
from anomnet.data import Sample
from anomnet.detectors.base import Detector, register
from anomnet.detectors.patchcore.config import PatchCoreConfig
from anomnet.detectors.patchcore.model import PatchCoreModel
from anomnet.errors import ConfigError, NotFittedError
from anomnet.training import PhaseRecord, timed_phase

BACKBONE_PREFIX = "backbone."


@register
class PatchCore(Detector):
    name = "patchcore"
    can_leave_out = True
    config_class = PatchCoreConfig
    description = "PatchCore: coreset memory bank of pretrained patch features (Roth et al. 2022)"
    config: PatchCoreConfig

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        # file-backed (ResNet) weights are read by fit() and then travel inside the saved model
        self._weights_from_file = get_backbone_info(c.backbone).needs_weights_file
        self._saves_backbone = False  # subclasses that train the backbone set True: its full state is saved
        self.model = PatchCoreModel(self._build_features(None), c.num_neighbors, c.blur_sigma)

    def _build_features(self, weights: str | None, search: bool = False) -> PatchFeatures:
        c = self.config
        backbone = build_backbone(c.backbone, c.layers, weights, search=search)
        return PatchFeatures(backbone, c.patch_size, grid_stride=0, embed_dim=c.embed_dim).eval()

    @property
    def features(self) -> PatchFeatures:
        return self.model.features

    @features.setter
    def features(self, value: PatchFeatures) -> None:
        self.model.features = value

    @property
    def memory_bank(self) -> torch.Tensor | None:
        return self.model.memory_bank

    @property
    def _nn(self) -> NearestNeighbors | None:
        return self.model.nn

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
            self.features = self._build_features(self.config.weights, search=True)

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
        clock = time.perf_counter()
        for images in self.training_batches(train, bar):  # whole images, or tiles
            f = extract(images)
            o = owners.next_batch(int(images.shape[0])).repeat_interleave(f.shape[1] * f.shape[2])
            f = f.reshape(-1, f.shape[-1])
            while f.shape[0]:
                if buf is None:  # allocated once: patches per image are fixed by the input size
                    per_image = f.shape[0] // images.shape[0]
                    buf = torch.empty(min(chunk, per_image * self.training_count(train)), f.shape[1])
                    owner_buf = torch.empty(buf.shape[0], dtype=torch.int32)
                take = min(buf.shape[0] - filled, f.shape[0])
                buf[filled : filled + take] = f[:take]
                owner_buf[filled : filled + take] = o[:take]
                filled, f, o = filled + take, f[take:], o[take:]
                if filled == buf.shape[0]:
                    now = time.perf_counter()
                    t_features += now - clock
                    idx = self._subsample(buf[:filled], progress)
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
            idx = self._subsample(buf[:filled], progress)
            kept.append(buf[idx].clone())
            kept_owner.append(owner_buf[idx].clone())
        t_coreset += time.perf_counter() - now
        del buf
        self.fit_record.phases.append(PhaseRecord(name="features", seconds=t_features))
        self.fit_record.phases.append(PhaseRecord(name="coreset", seconds=t_coreset))
        bank = torch.cat(kept) if len(kept) > 1 else kept[0]
        with timed_phase(self.fit_record, "index", patches=int(bank.shape[0])):
            self.model.set_bank(bank, self.config.nn_backend, self.config.nn_probe)
        self.model.bank_owner = torch.cat(kept_owner) if owners.complete() else None

    def _subsample(self, features: torch.Tensor, progress: bool) -> torch.Tensor:
        """Row indices of the coreset of one chunk of patch features."""
        c = self.config
        count = max(1, int(round(c.coreset_ratio * features.shape[0])))
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
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.model.memory_bank is None or self.model.nn is None:
            raise NotFittedError("PatchCore is not fitted: nothing to save")
        tensors = {"memory_bank": self.model.memory_bank}
        if self.model.bank_owner is not None:
            tensors["bank_owner"] = self.model.bank_owner
        if self.model.nn.centroids is not None:
            tensors["nn_centroids"] = self.model.nn.centroids
        backbone = self.features.backbone
        state = dict(backbone.state_dict()) if self._saves_backbone else backbone_state(backbone)
        tensors.update({BACKBONE_PREFIX + k: v for k, v in state.items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        n = len(BACKBONE_PREFIX)
        load_backbone_state(
            self.features.backbone, {k[n:]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
        )
        bank = tensors["memory_bank"].float().contiguous()
        backend = self.config.nn_backend
        if backend == "auto":  # search the way the fitted model did: IVF cells saved, or an exact index
            backend = "ivf" if "nn_centroids" in tensors else ("faiss" if faiss_available() else "exact")
        self.model.set_bank(bank, backend, self.config.nn_probe, tensors.get("nn_centroids"))
        owner = tensors.get("bank_owner")
        if owner is not None and owner.shape != (bank.shape[0],):
            raise ConfigError(f"bank_owner has shape {tuple(owner.shape)}, the bank {bank.shape[0]} rows")
        self.model.bank_owner = None if owner is None else owner.to(torch.int32)
