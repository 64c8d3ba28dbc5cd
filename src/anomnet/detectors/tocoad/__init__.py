"""ToCoAD: two-stage contrastive fine-tuning of the backbone, scored with PatchCore's memory bank."""

from anomnet.detectors.tocoad.config import ToCoADConfig
from anomnet.detectors.tocoad.detector import ToCoAD

__all__ = ["ToCoAD", "ToCoADConfig"]
