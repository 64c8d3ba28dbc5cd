"""Detectors. Importing this package registers every detector."""

from anomnet.detectors import anomnet as _anomnet  # noqa: F401  (registers)
from anomnet.detectors import (
    cpr,  # noqa: F401  (registers)
    efficientad,  # noqa: F401  (registers)
    hybrid,  # noqa: F401  (registers; its branches are any of the others)
    inpformer,  # noqa: F401  (registers)
    patchcore,  # noqa: F401  (registers)
    tocoad,  # noqa: F401  (registers)
)
from anomnet.detectors.base import DETECTORS, Detector, DetectorConfig, Prediction, create_detector, register

DEFAULT_DETECTOR = "patchcore"

__all__ = ["DETECTORS", "DEFAULT_DETECTOR", "Detector", "DetectorConfig", "Prediction", "create_detector", "register"]
