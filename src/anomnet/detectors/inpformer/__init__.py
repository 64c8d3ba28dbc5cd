"""INP-Former (Luo et al., CVPR 2025, "Exploring intrinsic normal prototypes within a single image").

A frozen encoder gives multi-level patch tokens; an INP extractor turns ``M`` learnable queries into
the image's own intrinsic normal prototypes (INPs) by cross-attention to its tokens; a bottleneck
fuses the levels; an INP-guided decoder reconstructs the encoder's features with the INPs as its
only keys and values, so defects are not reconstructed. Losses: INP coherence and soft mining.
The anomaly map is the per-group ``1 - cos`` of encoder and decoder features, upsampled, summed
and smoothed; the image score the mean of its top 1 % of pixels.

``config`` (settings), ``model`` (the predict-time module), ``losses``, ``detector`` (fit);
``optim`` (StableAdamW, the schedule) is used only in fit. Importing registers
``inpformer``. Choices measured and deviations from the paper: docs/inpformer.md.
"""

from anomnet.detectors.inpformer.config import INPFormerConfig
from anomnet.detectors.inpformer.detector import INPFormer
from anomnet.detectors.inpformer.model import INPDecoderBlock, INPExtractorBlock, INPFormerModel

__all__ = ["INPDecoderBlock", "INPExtractorBlock", "INPFormer", "INPFormerConfig", "INPFormerModel"]
