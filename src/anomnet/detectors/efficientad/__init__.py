"""EfficientAD: PDN student-teacher + autoencoder, with an optional CDO loss. Importing registers ``efficientad``.

``config`` (settings), ``model`` (the predict-time module: networks, fitted statistics, scoring), ``losses``,
``detector`` (fit); ``pdn``, ``autoencoder`` and ``distill`` (the backbone teacher and its distillation) hold
the method's parts.
"""

from anomnet.detectors.efficientad.config import EfficientADConfig
from anomnet.detectors.efficientad.detector import EfficientAD

__all__ = ["EfficientAD", "EfficientADConfig"]
