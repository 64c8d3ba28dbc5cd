"""The hybrid of the MVTec AD 2 VAND 2025 paper (Wang et al., "Accurate Anomaly Localization in Challenging
Industrial Settings via a Hybrid Detection Framework"): per object, the branch detector that measures best.

``config`` (settings: branches, their settings, mode, criterion, selection data), ``model`` (the
chosen branch's or the fused prediction, the normalisation), ``selection`` (the selection data,
the candidates' metrics, the choice), ``detector`` (fit orchestration and persistence); no
``losses``: the branches train theirs in their own fit, the hybrid optimises a choice. Importing
this package registers the detector. Design note: docs/hybrid.md.
"""

from anomnet.detectors.hybrid.config import HybridConfig
from anomnet.detectors.hybrid.detector import Hybrid
from anomnet.detectors.hybrid.model import HybridModel, Normalisation, fuse
from anomnet.detectors.hybrid.selection import FUSED, METRICS, choose, evaluate_candidates

__all__ = [
    "FUSED",
    "METRICS",
    "Hybrid",
    "HybridConfig",
    "HybridModel",
    "Normalisation",
    "choose",
    "evaluate_candidates",
    "fuse",
]
