"""Synthetic anomalies for training on good images only (seeded, deterministic).

A generator is called as ``generator(image, rng) -> (image, mask)`` on one ``[3,H,W]`` float
image in [0,1] with a ``torch.Generator``; it returns the altered image and a ``[H,W]`` float
mask (1 where pixels were altered, 0 elsewhere). Every random draw comes from ``rng``, so the
same seed gives the same anomalies.

* :class:`~anomnet.synthesis.perlin.PerlinAnomaly`: DRAEM / ToCoAD style: the good image
  rotated a little (and by a multiple of 90 degrees), a thresholded Perlin-noise mask, a texture
  blended into the masked region. Textures: :func:`~anomnet.synthesis.perlin.load_textures`
  (a user folder, the DTD subset, scikit-image's photos; the image itself when there are none).
* :class:`~anomnet.synthesis.cutpaste.CutPaste`: a recoloured rectangle of the image pasted elsewhere.
* :class:`~anomnet.synthesis.defects.RealisticDefects`: real-looking spots, cracks and scratches,
  or real defect crops from a folder (:func:`~anomnet.synthesis.defect_crops.load_defect_crops`),
  pasted onto the image (the MVTec AD 2 hybrid's pseudo-anomalies).
"""

from anomnet.synthesis.cutpaste import CutPaste
from anomnet.synthesis.defect_crops import DefectCrop, load_defect_crops
from anomnet.synthesis.defects import DEFECT_KINDS, RealisticDefects
from anomnet.synthesis.perlin import PerlinAnomaly, load_textures, perlin_noise, random_rotation, synthesize_batch

__all__ = [
    "DEFECT_KINDS",
    "CutPaste",
    "DefectCrop",
    "PerlinAnomaly",
    "RealisticDefects",
    "load_defect_crops",
    "load_textures",
    "perlin_noise",
    "random_rotation",
    "synthesize_batch",
]
