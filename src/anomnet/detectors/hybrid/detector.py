"""The hybrid's fit (every branch, then the measured choice) and its saved tensors.

A branch is any registered detector, built from the hybrid's settings: its own
``branch_settings`` over the hybrid's shared settings (``config.SHARED``: given to every branch
when set away from the defaults; ``seed``, ``train_rotations`` and ``aspect`` always;
``backbone`` / ``weights`` to the branches that have them). The resolved settings of every branch
are written into ``branch_configs`` and saved with the model, so a loaded hybrid rebuilds its
branches exactly. Each branch predicts through its own ``predict`` (its preprocessing, its tiling),
so branches may differ in input size or tiling.

Saved tensors: ``branch.<alias>.<name>`` for the branches predict uses (all with
``keep_branches``), and ``hybrid.used`` (branch indices), ``hybrid.fused``, ``hybrid.norm``
(``[branches, 4]``: image mean / std, map mean / std on the good validation images; zeros and ones
where not measured) and ``hybrid.evidence`` (``[candidates, metrics]``: every candidate's selection
metrics, candidates in branch order then ``fused``, metrics as ``selection.METRICS``).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from anomnet.data import Sample, iter_batches
from anomnet.detectors.base import DETECTORS, Detector, DetectorConfig, Prediction, register
from anomnet.detectors.hybrid.config import NAME, SHARED, SHARED_ALWAYS, SHARED_IF_KNOWN, HybridConfig
from anomnet.detectors.hybrid.model import HybridModel, Normalisation, NormalisationAccumulator
from anomnet.detectors.hybrid.selection import (
    FUSED,
    METRICS,
    choose,
    evaluate_candidates,
    labelled_batches,
    make_generator,
    synthetic_batches,
)
from anomnet.errors import ConfigError, NotFittedError
from anomnet.training import PhaseRecord, timed_phase

BRANCH_PREFIX = "branch."
STATE_PREFIX = "hybrid."


@register
class Hybrid(Detector):
    name = NAME
    config_class = HybridConfig
    description = (
        "Hybrid: every branch detector fitted, the one with the best criterion on validation images with "
        "synthetic (or labelled) defects predicts, or their normalised maps fused (Wang et al., VAND 2025)"
    )
    config: HybridConfig
    model: HybridModel
    accepts_labelled = True  # api.fit hands it the labelled validation set for the choice
    needs_validation = True  # the choice is made on held-out good images
    can_leave_out = True  # through the chosen branch, when that branch can (CPR, PatchCore, ToCoAD)

    def __init__(self, config: HybridConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.specs = dict(c.branch_specs())
        if not c.branch_configs:
            c.branch_configs = {alias: self._resolve(alias, det).to_dict() for alias, det in self.specs.items()}
        self.model = HybridModel()
        self.evidence: dict[str, dict[str, float]] = {}

    def _resolve(self, alias: str, detector: str) -> DetectorConfig:
        """The settings of branch ``alias``: the hybrid's shared settings, then the branch's own."""
        c = self.config
        cls = DETECTORS[detector].config_class
        defaults = DetectorConfig()
        settings: dict[str, Any] = {k: getattr(c, k) for k in SHARED_ALWAYS}
        settings.update({k: getattr(c, k) for k in SHARED if getattr(c, k) != getattr(defaults, k)})
        known = {f for f in cls().to_dict()}
        settings.update({k: getattr(c, k) for k in SHARED_IF_KNOWN if getattr(c, k) is not None and k in known})
        settings.update(c.branch_settings.get(alias, {}))
        try:
            return cls.from_dict(settings)
        except ConfigError as exc:
            raise ConfigError(f"branch {alias} ({detector}): {exc}") from None

    def branch(self, alias: str) -> Detector:
        """The branch detector ``alias``, built on first use from its saved settings."""
        if alias not in self.model.branches:
            detector = DETECTORS[self.specs[alias]]
            try:
                config = detector.config_class.from_dict(self.config.branch_configs[alias])
            except ConfigError as exc:
                raise ConfigError(f"branch {alias} ({self.specs[alias]}): {exc}") from None
            self.model.add(alias, detector(config))
        return self.model.branches[alias]

    # -- training ----------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        self.start_fit(train)
        c = self.config
        labelled = self.labelled_validation
        if not validation and labelled is None:
            raise ConfigError(
                "the hybrid chooses its branch on the good validation images: hold some out (--val-fraction) "
                "or give a labelled validation set (--labelled)"
            )
        aliases = list(self.specs)
        for alias in aliases:
            sub = self.branch(alias)
            if progress:
                print(f"[hybrid] fitting branch {alias} ({self.specs[alias]})", file=sys.stderr, flush=True)
            sub.fit(train, validation, progress)
            c.branch_configs[alias] = sub.config.to_dict()  # settings a branch resolves at fit (CPR's levels)
            self.fit_record.phases += [_prefixed(alias, p) for p in sub.fit_record.phases]
            self.fit_record.data_sources.update({f"{alias}.{k}": v for k, v in sub.fit_record.data_sources.items()})
        branches = {a: self.model.branches[a] for a in aliases}
        with_fused = c.mode in ("fuse", "auto") and len(aliases) > 1
        norms = None
        if with_fused:
            with timed_phase(self.fit_record, "normalise", images=len(validation)):
                norms = self._normalisations(branches, validation)
            self.model.norms = norms
        with timed_phase(self.fit_record, "select", criterion=c.criterion) as phase:
            if labelled is not None:
                source = f"labelled validation set ({len(labelled)} images)"
                batches = labelled_batches(labelled, c.batch_size)
            else:
                source = (
                    f"{len(validation)} good validation images and {c.synthetic_per_image} {c.synthetic} "
                    "defective copies of each"
                )
                generator = make_generator(c)
                batches = synthetic_batches(validation, generator, c.synthetic_per_image, c.seed, c.batch_size)
            self.evidence, good, bad = evaluate_candidates(branches, batches, c.select_side, norms)
            chosen = FUSED if c.mode == "fuse" and with_fused else choose(self.evidence, c.criterion)
            if chosen == FUSED:
                self.model.used, self.model.fused = aliases, True
            else:
                self.model.used, self.model.fused = [chosen], False
            phase.extra.update(
                {
                    "chosen": chosen,
                    "mode": c.mode,
                    "source": source,
                    "good_images": good,
                    "defective_images": bad,
                    "candidates": {k: {m: _finite(v) for m, v in vals.items()} for k, vals in self.evidence.items()},
                }
            )

    def _normalisations(self, branches: dict[str, Detector], validation: Sequence[Sample]) -> dict[str, Normalisation]:
        acc = {a: NormalisationAccumulator() for a in branches}
        with torch.inference_mode():
            for batch in iter_batches(validation, self.config.batch_size):
                for alias, sub in branches.items():
                    acc[alias].add(sub.predict(batch.images))
        return {a: v.result() for a, v in acc.items()}

    @property
    def fitted(self) -> bool:
        """True once fit or load has chosen the branch(es) predict uses."""
        return bool(self.model.used)

    @property
    def choice(self) -> dict[str, Any]:
        """The branch(es) predict uses and the evidence of the choice (from the saved state)."""
        if not self.fitted:
            raise NotFittedError("the hybrid detector is not fitted: call fit() or load a saved model")
        return {
            "chosen": FUSED if self.model.fused else self.model.used[0],
            "branches": {a: self.specs[a] for a in self.model.used},
            "criterion": self.config.criterion,
            "mode": self.config.mode,
            "candidates": {k: {m: _finite(v) for m, v in vals.items()} for k, vals in self.evidence.items()},
        }

    def describe_choice(self) -> str:
        """One line for the user: what predicts, and each candidate's criterion."""
        info = self.choice
        values = ", ".join(f"{name} {_fmt(vals.get(info['criterion']))}" for name, vals in info["candidates"].items())
        what = "fused map of " + ", ".join(info["branches"]) if self.model.fused else str(info["chosen"])
        return f"hybrid: predicts with {what}; {info['criterion']} on the selection data: {values}"

    def fitted_branches(self) -> dict[str, Detector]:
        """The fitted branch detectors by alias (after fit all of them; after load the saved ones)."""
        return {a: self.model.branches[a] for a in self.specs if a in self.model.branches}

    @property
    def supports_leave_out(self) -> bool:
        """True when predict uses one branch (no fused map) and that branch can leave a training image out."""
        return len(self.model.used) == 1 and not self.model.fused and self._used_branch().supports_leave_out

    def leave_out(self, images: Sequence[int]) -> contextlib.AbstractContextManager[None]:
        """The used branch's leave-out: every branch was fitted on the hybrid's training images, in its order."""
        if not self.supports_leave_out:
            what = "a fused map" if self.model.fused else f"branch {', '.join(self.model.used) or '(none)'}"
            raise ConfigError(f"the hybrid predicts with {what}, which cannot leave a training image out")
        return self._used_branch().leave_out(images)

    def _used_branch(self) -> Detector:
        return self.model.branches[self.model.used[0]]

    @property
    def backbone_name(self) -> str | None:
        """The backbone of the first branch predict uses (for timing against the backbone trunk)."""
        if self.config.backbone:
            return self.config.backbone
        used = self.model.used or list(self.specs)
        return self.config.branch_configs[used[0]].get("backbone")

    # -- inference ---------------------------------------------------------------------
    def predict_batch(self, images: torch.Tensor) -> Prediction:
        """The used branch's prediction (each branch preprocesses and tiles as it was fitted), or the fused one."""
        return self.model(images)

    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the export traces: the images its graph preprocessed at the hybrid's size, predicted as above."""
        pred = self.model(images)
        return pred.scores, pred.maps

    # -- persistence -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise NotFittedError("the hybrid detector is not fitted: nothing to save")
        aliases = list(self.specs)
        keep = aliases if self.config.keep_branches else self.model.used
        tensors: dict[str, torch.Tensor] = {}
        for alias in keep:
            state = self.model.branches[alias].state_tensors()
            tensors.update({f"{BRANCH_PREFIX}{alias}.{k}": v for k, v in state.items()})
        norm = [self.model.norms.get(a, Normalisation()).as_tensor() for a in aliases]
        candidates = [*aliases, FUSED]
        evidence = torch.full((len(candidates), len(METRICS)), math.nan, dtype=torch.float64)
        for i, name in enumerate(candidates):
            for j, metric in enumerate(METRICS):
                evidence[i, j] = self.evidence.get(name, {}).get(metric, math.nan)
        tensors[STATE_PREFIX + "used"] = torch.tensor([aliases.index(a) for a in self.model.used], dtype=torch.int64)
        tensors[STATE_PREFIX + "fused"] = torch.tensor([int(self.model.fused)], dtype=torch.int64)
        tensors[STATE_PREFIX + "norm"] = torch.stack(norm)
        tensors[STATE_PREFIX + "evidence"] = evidence
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        aliases = list(self.specs)
        candidates = [*aliases, FUSED]
        used = [aliases[int(i)] for i in tensors[STATE_PREFIX + "used"].tolist()]
        norm = tensors[STATE_PREFIX + "norm"]
        evidence = tensors[STATE_PREFIX + "evidence"]
        if norm.shape != (len(aliases), 4) or evidence.shape != (len(candidates), len(METRICS)) or not used:
            raise KeyError("hybrid state does not match its branches")
        self.model.norms = {a: Normalisation.from_tensor(norm[i]) for i, a in enumerate(aliases)}
        self.evidence = {
            name: {m: float(evidence[i, j]) for j, m in enumerate(METRICS)}
            for i, name in enumerate(candidates)
            if not bool(torch.isnan(evidence[i]).all())
        }
        saved = {k[len(BRANCH_PREFIX) :].partition(".")[0] for k in tensors if k.startswith(BRANCH_PREFIX)}
        for alias in saved:
            prefix = f"{BRANCH_PREFIX}{alias}."
            if alias not in self.specs:
                raise KeyError(f"saved tensors of an unknown branch {alias!r}")
            self.branch(alias).load_state_tensors(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        missing = [a for a in used if a not in saved]
        if missing:
            raise KeyError(f"the saved model lacks the tensors of branch {', '.join(missing)}")
        self.model.used, self.model.fused = used, bool(int(tensors[STATE_PREFIX + "fused"][0]))


def _prefixed(alias: str, phase: PhaseRecord) -> PhaseRecord:
    return PhaseRecord(**{**phase.__dict__, "name": f"{alias}:{phase.name}"})


def _finite(value: float) -> float | None:
    return value if value == value else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"
