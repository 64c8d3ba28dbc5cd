"""The operator's marks from the review page, saved as a labelled validation folder per model.

An operator who looks at a scored image can say the model was wrong (``false_alarm``: flagged
but good; ``missed_defect``: passed but defective) or right (``confirmed_good``,
``confirmed_defect``). Each mark stores the image, exactly as it was sent, in the layout that
``anomnet calibrate --labelled`` reads (:func:`anomnet.decisions.calibrate.load_labelled`)::

    REVIEW/<model>/
      good/<stem>-<id>.<ext>        false alarms and confirmed good images
      defective/<stem>-<id>.<ext>   missed defects and confirmed defects (image labels only, no masks)
      review.json                   every mark: id, mark, label, file, the name it was sent with, time

so ``anomnet calibrate --model-dir M --labelled REVIEW/<model> --image-threshold f1`` re-picks the
threshold from the reviewed images without refitting (it needs at least one defective image).
``<id>`` is the first 16 hex digits of the image's SHA-256: marking the same image again replaces
its earlier mark (the file moves to the other folder when the label changes).

Every file is written atomically; the folder names come from the server (the model's name was
checked when the service started, the file name is built here), never from the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from anomnet import durable, imageio
from anomnet.serve.limits import EXTENSIONS, RequestError

MARKS: dict[str, str] = {
    "false_alarm": "good",
    "missed_defect": "defective",
    "confirmed_good": "good",
    "confirmed_defect": "defective",
}
"""Each mark and the label (subfolder) it stands for."""

LABELS = ("good", "defective")
INDEX = "review.json"
INDEX_FORMAT = "anomnet-review"
INDEX_VERSION = 1
_ID = re.compile(r"^[0-9a-f]{16}$")


def image_id(data: bytes) -> str:
    """The id of an image: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


def safe_stem(name: str) -> str:
    """A file-name stem made of the client's name: letters, digits, ``._-`` only, at most 40 characters."""
    stem = Path(name.replace("\\", "/")).stem if name else ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:40]
    return stem or "image"


class ReviewStore:
    """The review folders of every model below ``root`` (see the module doc)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def folder(self, model: str) -> Path:
        return self.root / model

    def save(self, model: str, name: str, data: bytes, fmt: str, mark: str) -> dict[str, Any]:
        """Store one marked image (``fmt`` from :func:`~anomnet.serve.limits.check_image_bytes`); its index entry."""
        if mark not in MARKS:
            raise RequestError(400, f"mark {mark!r} unknown; use one of: {', '.join(MARKS)}")
        label = MARKS[mark]
        key = image_id(data)
        rel = f"{label}/{safe_stem(name)}-{key}{EXTENSIONS[fmt]}"
        with self._lock:
            index = self._read_index(model)
            old = index["marks"].get(key)
            target = self._inside(model, rel)
            durable.write_file(target, data)
            entry = {
                "id": key,
                "mark": mark,
                "label": label,
                "file": rel,
                "name": name[:200],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            index["marks"][key] = entry
            self._write_index(model, index)
            if old is not None and old.get("file") != rel:
                self._unlink(model, str(old.get("file", "")))
        return entry

    def remove(self, model: str, key: str) -> bool:
        """Forget the mark of image ``key`` and delete its file; False when there was none."""
        if not _ID.match(key):
            raise RequestError(400, f"{key!r} is not an image id (16 hex digits)")
        with self._lock:
            index = self._read_index(model)
            old = index["marks"].pop(key, None)
            if old is None:
                return False
            self._write_index(model, index)
            self._unlink(model, str(old.get("file", "")))
        return True

    def marks(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self._read_index(model)["marks"].values(), key=lambda e: (e["time"], e["id"]))

    def _inside(self, model: str, rel: str) -> Path:
        """``REVIEW/<model>/<rel>``, refused when links would take it outside the review folder."""
        root = Path(os.path.realpath(self.root))
        target = self.folder(model) / rel
        resolved = Path(os.path.realpath(target))
        if not resolved.is_relative_to(root):
            raise RequestError(403, f"the review folder of {model!r} leads outside {self.root} (a link?)")
        return target

    def _read_index(self, model: str) -> dict[str, Any]:
        path = self._inside(model, INDEX)
        if not path.is_file():
            return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "model": model, "marks": {}}
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RequestError(500, f"the review index {path} cannot be read ({exc}); fix or remove it") from None
        if (
            not isinstance(index, dict)
            or index.get("format") != INDEX_FORMAT
            or not isinstance(index.get("marks"), dict)
        ):
            raise RequestError(500, f"{path} is not an anomnet review index; fix or remove it")
        return index

    def _write_index(self, model: str, index: dict[str, Any]) -> None:
        imageio.atomic_write_text(self._inside(model, INDEX), json.dumps(index, indent=1, sort_keys=True) + "\n")

    def _unlink(self, model: str, rel: str) -> None:
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            return
        target = self._inside(model, rel)
        if target.is_file():
            target.unlink()
