"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

``config`` (settings), ``model`` (the module used at predict time), ``losses`` (none: why),
``detector`` (fit orchestration and persistence). Importing this package registers the detector.
"""

from anomnet.components.features import PatchFeatures
from anomnet.detectors.patchcore.config import PatchCoreConfig
from anomnet.detectors.patchcore.detector import PatchCore
from anomnet.detectors.patchcore.model import PatchCoreModel

__all__ = ["PatchCore", "PatchCoreConfig", "PatchCoreModel", "PatchFeatures"]
