"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

``config`` (settings), ``model`` (the module used at predict time: the bank, its search and the
scoring, eq. 7), ``detector`` (fit orchestration); no ``losses``: PatchCore trains nothing, its fit
extracts features and subsamples them (greedy coreset). Importing this package registers the detector.
"""

from anomnet.components.features import PatchFeatures
from anomnet.detectors.patchcore.config import PatchCoreConfig
from anomnet.detectors.patchcore.detector import PatchCore
from anomnet.detectors.patchcore.model import PatchCoreModel

__all__ = ["PatchCore", "PatchCoreConfig", "PatchCoreModel", "PatchFeatures"]
