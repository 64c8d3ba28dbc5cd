"""Exported models (``anomnet export``): a graph plus its manifest, scored without torch.

Being written (issue 14): until then an exported folder is refused with a clear message.
"""

from __future__ import annotations

from pathlib import Path

from anomnet.errors import ModelFormatError
from anomnet.scoring import Scorer


def load_exported(folder: str | Path) -> Scorer:
    """The :class:`~anomnet.scoring.Scorer` of an exported model folder."""
    raise ModelFormatError(f"{folder}: exported models cannot be read by this anomnet yet")
