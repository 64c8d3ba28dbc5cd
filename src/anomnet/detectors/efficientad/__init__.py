"""EfficientAD: PDN student-teacher + autoencoder, with an optional CDO loss. Importing registers ``efficientad``."""

from anomnet.detectors.efficientad.detector import EfficientAD, EfficientADConfig

__all__ = ["EfficientAD", "EfficientADConfig"]
