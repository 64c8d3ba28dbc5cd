"""Record every image file the library reads (anomnet.imageio.read_image and data's import of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def spy_on_image_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A list that fills with the path of every image read until ``monkeypatch`` is undone."""
    from anomnet import data, imageio

    reads: list[Path] = []
    for module in (imageio, data):
        original = module.read_image

        def spy(path: str | Path, _original=original) -> np.ndarray:
            reads.append(Path(path))
            return _original(path)

        monkeypatch.setattr(module, "read_image", spy)
    return reads
