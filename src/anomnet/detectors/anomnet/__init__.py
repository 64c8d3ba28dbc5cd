"""AnomNet (Gao et al., J. Imaging 2025, 11, 301): centroid-guided contrastive learning on frozen features.

Features of several levels of a frozen ImageNet CNN (EfficientNet-Lite stage2-4 by default) are
brought to one grid (stride 8) and concatenated. A CoordConv adapter maps them into the space
where ``K`` centroids live. Training has two stages:

1. centroid optimisation: ``alpha L_att + beta L_sep + gamma L_ent`` (adapter and centroids);
2. centroid-guided contrastive learning, centroids fixed: ``delta L_att + lambda L_con``.

A location scores its distance to the nearest centroid; the map is upsampled, smoothed and
min-max normalised with the good validation maps; the image score is the map's maximum.
Collapse guard (``adapter="residual"``): see :class:`~anomnet.detectors.anomnet.model.CoordConvAdapter`.

``config`` (settings), ``model`` (the module used at predict time), ``losses`` (the loss
functions), ``detector`` (fit orchestration and persistence). Importing this package registers it.
The measured choices and the ablation settings are in docs/anomnet.md.
"""

from anomnet.detectors.anomnet.config import AnomNetConfig
from anomnet.detectors.anomnet.detector import AnomNet
from anomnet.detectors.anomnet.model import AnomNetModel, CoordConvAdapter, coordinates, default_layers

__all__ = ["AnomNet", "AnomNetConfig", "AnomNetModel", "CoordConvAdapter", "coordinates", "default_layers"]
