"""CPR (Li et al., "Target before shooting: cascade patch retrieval", TIP 2024). Importing registers ``cpr``.

A test image first retrieves its ``k_images`` most similar training images (global retrieval on
block histograms of codewords); each of its locations then searches only a small window around
the same place in those images (local retrieval on features of a head trained on the frozen
backbone); an unsupervised foreground estimate suppresses the background on objects.

``config`` (settings), ``model`` (the predict-time module, plain torch), ``losses`` (the
training loss), ``detector`` (fit); ``retrieval`` (global and local retrieval),
``foreground``, ``head`` and ``pairs`` (training point pairs) hold the method's parts.
Choices and measurements: docs/cpr.md.
"""

from anomnet.detectors.cpr.config import CPRConfig
from anomnet.detectors.cpr.detector import CPR
from anomnet.detectors.cpr.model import CPRModel

__all__ = ["CPR", "CPRConfig", "CPRModel"]
