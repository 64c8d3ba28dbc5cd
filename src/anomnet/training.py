"""The one training harness: every detector hands its step function to :func:`train_phase`.

It owns what each fit repeats: seeding, the progress bar, the optional wall-clock budget and
the fit record (phases, seconds, steps, first and last loss, the data sources used). The
record is saved in ``anomnet.json`` with the model and copied into the benchmark JSON.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

Losses = float | Mapping[str, float]
"""What a step returns: its loss, or several named losses (the first one is "the" loss)."""


@dataclass
class PhaseRecord:
    """One phase of a fit: an iterative training loop or a one-off computation."""

    name: str
    seconds: float = 0.0
    steps: int = 0
    planned_steps: int = 0
    stopped_by_budget: bool = False
    loss_first: dict[str, float] = field(default_factory=dict)
    loss_last: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitRecord:
    """What a fit did, in JSON-serialisable form."""

    phases: list[PhaseRecord] = field(default_factory=list)
    data_sources: dict[str, str] = field(default_factory=dict)
    seed: int | None = None

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def phase(self, name: str) -> PhaseRecord | None:
        return next((p for p in self.phases if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "seed": self.seed,
            "data_sources": dict(self.data_sources),
            "phases": [asdict(p) for p in self.phases],
        }

    @classmethod
    def from_dict(cls, data: Any) -> FitRecord:
        """Best effort: a record is informative only, so a damaged one loads as empty."""
        if not isinstance(data, dict):
            return cls()
        known = set(PhaseRecord.__dataclass_fields__)
        phases = [
            PhaseRecord(**{k: v for k, v in p.items() if k in known})
            for p in data.get("phases", [])
            if isinstance(p, dict) and isinstance(p.get("name"), str)
        ]
        sources = data.get("data_sources", {})
        seed = data.get("seed")
        return cls(
            phases,
            {str(k): str(v) for k, v in sources.items()} if isinstance(sources, dict) else {},
            seed if isinstance(seed, int) else None,
        )


def seed_everything(seed: int) -> None:
    """Seed every random generator a fit may draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_losses(value: Losses) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {"loss": float(value)}


def train_phase(
    record: FitRecord,
    name: str,
    step: Callable[[int], Losses],
    steps: int,
    *,
    time_budget_s: float | None = None,
    progress: bool = True,
    postfix_every: int = 10,
) -> PhaseRecord:
    """Run ``step(i)`` for ``i = 0 .. steps-1`` (fewer if the time budget runs out first).

    ``step`` does one optimisation step and returns its loss(es). The phase is appended to
    ``record`` with its seconds, step count and first / last losses.
    """
    phase = PhaseRecord(name=name, planned_steps=steps)
    record.phases.append(phase)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=name, disable=not progress, leave=False, unit="step")
    try:
        for i in range(steps):
            losses = _as_losses(step(i))
            if not phase.loss_first:
                phase.loss_first = losses
            phase.loss_last = losses
            phase.steps = i + 1
            bar.update(1)
            if postfix_every and i % postfix_every == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:3]})
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s and i + 1 < steps:
                phase.stopped_by_budget = True
                break
    finally:
        bar.close()
        phase.seconds = time.perf_counter() - start
    for losses in (phase.loss_first, phase.loss_last):
        for key, value in losses.items():
            if not math.isfinite(value):
                losses[key] = float("nan")
    return phase


def parameter_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter of ``module``, by name (to measure what a phase changed)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def weight_change(before: Mapping[str, torch.Tensor], module: torch.nn.Module) -> dict[str, Any]:
    """How far a phase moved ``module``'s parameters from ``before`` (:func:`parameter_snapshot`).

    ``relative``: ``||w_after - w_before|| / ||w_before||`` over all parameters together;
    ``largest_tensor`` / ``largest_relative``: the parameter with the largest own relative change
    (parameters that were all zero have no relative change and are left out of that pick).
    """
    diff2 = norm2 = 0.0
    largest, largest_rel = "", 0.0
    for name, p in module.named_parameters():
        old = before[name].to(torch.float64)
        d2 = float((p.detach().to(torch.float64) - old).square().sum())
        n2 = float(old.square().sum())
        diff2, norm2 = diff2 + d2, norm2 + n2
        if n2 > 0 and (math.sqrt(d2 / n2) > largest_rel or not largest):
            largest, largest_rel = name, math.sqrt(d2 / n2)
    return {
        "relative": math.sqrt(diff2 / norm2) if norm2 > 0 else 0.0,
        "largest_tensor": largest,
        "largest_relative": largest_rel,
    }


@contextlib.contextmanager
def timed_phase(record: FitRecord, name: str, **extra: Any) -> Iterator[PhaseRecord]:
    """A one-off phase (feature extraction, coreset, calibration): only its seconds are recorded."""
    phase = PhaseRecord(name=name, extra=dict(extra))
    record.phases.append(phase)
    start = time.perf_counter()
    try:
        yield phase
    finally:
        phase.seconds = time.perf_counter() - start
