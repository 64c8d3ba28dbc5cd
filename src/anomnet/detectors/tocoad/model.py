"""ToCoAD's predict-time module is PatchCore's (memory bank + nearest-neighbour search) on the fine-tuned backbone.

The discriminator (:mod:`.discriminator`) and the SimSiam head (:mod:`.simsiam`) are used only in fit.
"""

from anomnet.detectors.patchcore.model import PatchCoreModel

ToCoADModel = PatchCoreModel

__all__ = ["ToCoADModel"]
