"""The models a service scores with, each following its folder: a recalibrated or refitted model is picked up whole.

A request takes one :class:`ServedModel` (an immutable snapshot: scorer, thresholds, version) when its
work starts and scores every image of the request with it; a reload builds a complete new snapshot
and then swaps one reference. So a request sees the old model or the new one, never a mix.

A reload is noticed by the model folder's *fingerprint*: the inode, size and modification time of its
metadata file (``anomnet.json`` of a fitted model, ``manifest.json`` of an exported one), which every
``fit``, ``calibrate`` and ``export`` replaces. At most every ``check_s`` seconds a request looks (one
``stat``); a changed fingerprint starts a loader thread, and requests go on with the current model
meanwhile. The loader reads the metadata's bytes (their SHA-256 is the model's *version*), loads the
model (which checks the weights against the hashes in that metadata), and accepts it only when the
fingerprint is still the one it started from: a folder caught halfway through a replacement is
loaded again at the next check, and a model that fails to load is logged and the old one kept.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomnet.errors import ConfigError
from anomnet.predict.scoring import EXPORT_MANIFEST, MODEL_META, Scorer, load_scorer

LOG = logging.getLogger("anomnet.serve")

CHECK_SECONDS = 2.0
"""Default seconds between two looks at a model folder's fingerprint."""

Fingerprint = tuple[int, int, int, int] | None
"""(device, inode, size, mtime_ns) of the model folder's metadata file; None when it cannot be read."""


def fingerprint(folder: Path) -> Fingerprint:
    for name in (MODEL_META, EXPORT_MANIFEST):
        try:
            st = os.stat(folder / name)
        except OSError:
            continue
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return None


def version_of(folder: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the folder's metadata file ('' when there is none)."""
    for name in (MODEL_META, EXPORT_MANIFEST):
        try:
            return hashlib.sha256((folder / name).read_bytes()).hexdigest()[:16]
        except OSError:
            continue
    return ""


@dataclass(frozen=True)
class ServedModel:
    """One model the service scores with, under its ``name``: a snapshot, never changed once made."""

    name: str
    scorer: Scorer
    source: str
    version: str = ""
    """SHA-256 (16 hex digits) of the metadata file it was loaded from ('' for a scorer given in code)."""
    fingerprint: Fingerprint = None
    loaded: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @property
    def folder(self) -> Path | None:
        return Path(self.source) if self.fingerprint is not None else None

    def info(self) -> dict[str, Any]:
        cal = self.scorer.calibration
        n = len(cal.validation_scores)
        detector = getattr(self.scorer, "detector", None)  # a fitted Detector, or an exported model's detector name
        if detector is not None and not isinstance(detector, str):
            detector = getattr(detector, "name", None)
        return {
            "name": self.name,
            "detector": detector,
            "kind": "exported" if (Path(self.source) / EXPORT_MANIFEST).is_file() else "fitted",
            "version": self.version or None,
            "loaded": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.loaded)),
            "image_method": cal.image_method,
            "threshold": finite(cal.threshold),
            "max_false_alarm": cal.max_false_alarm,
            "achieved_false_alarm": finite(cal.achieved_false_alarm),
            "validation_images": n,
            "finest_false_alarm": 1.0 / (n + 1),
            "pixel_threshold": finite(cal.pixel_threshold),
            # the heat maps' fixed colour scale (anomnet.predict.visualize): blue at map_low, mid-scale at map_high
            "map_low": finite(cal.map_low),
            "map_high": finite(cal.map_high),
        }


def finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def load_served(name: str, model: str | Path | Scorer) -> ServedModel:
    """A snapshot of ``model`` (a folder, loaded now, or a scorer) under ``name``."""
    if not isinstance(model, (str, Path)):
        return ServedModel(name, load_scorer(model), type(model).__name__)
    folder = Path(model)
    for _ in range(5):  # a folder being replaced right now: try again with the new one
        before = fingerprint(folder)
        version = version_of(folder)
        scorer = load_scorer(folder)
        if before is not None and fingerprint(folder) == before:
            return ServedModel(name, scorer, str(folder), version, before)
        time.sleep(0.05)
    raise ConfigError(f"{folder}: the model folder kept changing while it was loaded; try again when it is written")


class ModelRegistry:
    """Every served model by name; :meth:`get` gives the current snapshot and notices changed folders."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        check_s: float | None = CHECK_SECONDS,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._models = dict(models)
        self.check_s = check_s
        self._log = log or LOG.warning
        self._lock = threading.Lock()
        self._checked: dict[str, float] = dict.fromkeys(self._models, time.monotonic())
        self._loading: dict[str, threading.Thread] = {}
        self._failed: dict[str, Fingerprint] = {}  # the fingerprint a failed load was tried with (logged once)

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel | None:
        """The current snapshot of ``name`` (None: no such model); a changed folder starts its reload."""
        model = self._models.get(name)
        if model is not None and model.folder is not None and self.check_s is not None:
            now = time.monotonic()
            if now - self._checked.get(name, 0.0) >= self.check_s:
                self._checked[name] = now
                self._maybe_reload(model, wait=False)
        return model

    def all(self) -> list[ServedModel]:
        return [m for name in self.names() if (m := self.get(name)) is not None]

    def reload(self, name: str) -> ServedModel:
        """Check ``name``'s folder now and, if it changed, load it before returning (tests, an admin hook)."""
        model = self._models[name]
        if model.folder is not None:
            self._maybe_reload(model, wait=True)
        return self._models[name]

    def _maybe_reload(self, model: ServedModel, wait: bool) -> None:
        assert model.folder is not None
        now = fingerprint(model.folder)
        if now == model.fingerprint or now is None or self._failed.get(model.name) == now:
            return
        with self._lock:
            thread = self._loading.get(model.name)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(
                    target=self._load, args=(model.name,), daemon=True, name=f"anomnet-reload-{model.name}"
                )
                self._loading[model.name] = thread
                thread.start()
        if wait:
            thread.join()

    def _load(self, name: str) -> None:
        old = self._models[name]
        assert old.folder is not None
        try:
            new = load_served(name, old.folder)
        except Exception as exc:  # noqa: BLE001 - the service goes on with the model it has
            self._failed[name] = fingerprint(old.folder)
            self._log(
                f"model {name}: {old.folder} changed but cannot be loaded ({type(exc).__name__}: {exc}); "
                f"still serving version {old.version}"
            )
            return
        self._failed.pop(name, None)
        with self._lock:
            self._models[name] = new
        before, after = old.scorer.calibration, new.scorer.calibration
        self._log(
            f"model {name}: reloaded {old.folder}: version {old.version} -> {new.version}, "
            f"threshold {before.threshold:.6g} -> {after.threshold:.6g} ({after.image_method})"
        )
