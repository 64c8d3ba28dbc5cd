"""Heat maps and overlays a person can open.

Colour scale: blue at the median map value of the good validation images, the middle of the
scale at the highest value seen on them, red at twice that distance. A good image therefore
never turns fully red, and the scale is the same for every image of a model.
"""

from __future__ import annotations

import numpy as np

from anomnet.calibration import Calibration


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0,1] -> uint8 RGB (a jet-like blue-cyan-yellow-red ramp)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def scale_map(amap: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Anomaly map -> [0,1] display values with the model's fixed scale."""
    span = max(calibration.map_high - calibration.map_low, 1e-12)
    return np.clip((np.asarray(amap, dtype=np.float32) - calibration.map_low) / (2.0 * span), 0.0, 1.0)


def heatmap(amap: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Colour heat map (uint8 HxWx3) of an anomaly map."""
    return colormap(scale_map(amap, calibration))


def overlay(image: np.ndarray, amap: np.ndarray, calibration: Calibration, alpha: float = 0.5) -> np.ndarray:
    """Heat map blended over the image (float HxWx3 in [0,1]); uint8 HxWx3."""
    heat = heatmap(amap, calibration).astype(np.float32) / 255.0
    out = (1.0 - alpha) * np.asarray(image, dtype=np.float32) + alpha * heat
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def draw_contour(
    rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255), width: int | None = None
) -> np.ndarray:
    """Copy of a uint8 HxWx3 image with the outline of a boolean mask drawn in ``color``.

    The outline is the mask minus its erosion, ``width`` pixels thick (default: about 1/300 of
    the shorter side, at least 1); regions touching the image border are outlined there too.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    out = np.array(rgb, dtype=np.uint8, copy=True)
    if not m.any():
        return out
    w = width if width is not None else max(1, round(min(m.shape) / 300))
    inner = ndimage.binary_erosion(m, structure=np.ones((3, 3), dtype=bool), iterations=w, border_value=0)
    out[m & ~inner] = color
    return out
