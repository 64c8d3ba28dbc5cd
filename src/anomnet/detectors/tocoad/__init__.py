"""ToCoAD: two-stage contrastive fine-tuning of the backbone, scored with PatchCore's memory bank.

``config`` (settings), ``model`` (the predict-time module), ``losses``, ``detector`` (fit and persistence);
``discriminator``, ``simsiam`` and ``augment`` are used only in fit. Importing registers ``tocoad``.
"""

from anomnet.detectors.tocoad.config import ToCoADConfig
from anomnet.detectors.tocoad.detector import ToCoAD
from anomnet.detectors.tocoad.model import ToCoADModel

__all__ = ["ToCoAD", "ToCoADConfig", "ToCoADModel"]
