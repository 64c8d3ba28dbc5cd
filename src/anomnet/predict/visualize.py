"""Heat maps and overlays a person can open.

Colour scale: blue at the median map value of the good validation images, the middle of the
scale at the highest value seen on them, red at twice that distance. A good image therefore
never turns fully red, and the scale is the same for every image of a model.

:func:`colour_bar` draws that scale with its numbers (anomaly-map units: the median, the highest good
value, the top) and the pixel threshold marked; :func:`labelled_panels` puts pictures side by side
under titles with the bar beside them. Numpy and Pillow only (no torch, no matplotlib): exported
models draw them too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anomnet.decisions.calibration import Calibration


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


# --------------------------------------------------------------------------------------------
# colour bar and labelled panels
# --------------------------------------------------------------------------------------------

#: Significant digits of the colour bar's numbers.
LABEL_DIGITS = 4
_INK = (20, 20, 20)
_THRESHOLD_INK = (150, 0, 150)
_PAPER = (255, 255, 255)


@dataclass(frozen=True)
class Tick:
    """One number on the colour bar: its value (anomaly-map units), the text shown and the row it marks."""

    kind: str  # "top", "high", "low" or "pixel threshold"
    value: float
    label: str
    row: int  # the row of the rendered picture the tick line is drawn on


@dataclass(frozen=True)
class Layout:
    """Where things are in a picture drawn by :func:`colour_bar` or :func:`labelled_panels`.

    ``bar``: (left, top, right, bottom) of the colour ramp (right / bottom exclusive); ``ticks``: its numbers;
    ``panels``: each panel's title and (left, top, right, bottom) box.
    """

    bar: tuple[int, int, int, int]
    ticks: tuple[Tick, ...]
    panels: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()

    def tick(self, kind: str) -> Tick | None:
        return next((t for t in self.ticks if t.kind == kind), None)


def scale_range(calibration: Calibration) -> tuple[float, float]:
    """The anomaly-map values at the bottom (blue) and the top (red) of the model's colour scale."""
    low = float(calibration.map_low)
    span = max(float(calibration.map_high) - low, 1e-12)
    return low, low + 2.0 * span


def format_value(value: float) -> str:
    """A colour-bar number: :data:`LABEL_DIGITS` significant digits."""
    return f"{value:.{LABEL_DIGITS}g}"


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def font_size(height: int) -> int:
    """Text height for pictures ``height`` pixels tall: readable at 64 px, not shouting at 1000 px."""
    return int(min(28, max(11, round(height / 32))))


def _text_box(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _put_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, fill: Any) -> None:
    """``text`` with its ink box's top-left corner at ``xy``."""
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - left, xy[1] - top), text, font=font, fill=fill)


def colour_bar(calibration: Calibration, height: int, top_margin: int = 0) -> tuple[np.ndarray, Layout]:
    """A white strip ``height`` pixels tall with the model's colour scale, its numbers and the pixel threshold.

    The ramp runs from :func:`scale_range`'s low (bottom, blue: the median map value of the good validation
    images) through ``map_high`` (middle: the highest value seen on them) to the top (red); each tick is
    labelled with its value in the anomaly map's own units. The pixel threshold (where a defective image's
    mask starts) is a line across the ramp with its value on the left (at the ramp's end, with an arrow, when
    it lies off the scale). ``top_margin`` rows above stay free (for a title). Returns the strip (uint8 HxWx3)
    and its :class:`Layout`.
    """
    size = font_size(height - top_margin)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    low, top = scale_range(calibration)
    high = float(calibration.map_high)
    thr = float(calibration.pixel_threshold)
    pad = max(size // 2 + 2, 6)
    bar_w = max(12, size)
    tick_w = max(4, size // 3)
    y0, y1 = top_margin + pad, max(top_margin + pad + 8, height - pad)  # ramp rows [y0, y1)
    n_rows = y1 - y0

    def row_of(value: float) -> int:
        frac = (top - value) / (top - low)
        return y0 + int(round(min(max(frac, 0.0), 1.0) * (n_rows - 1)))

    scale_ticks = [("top", top), ("high", high), ("low", low)]
    right_text = {"top": "", "high": "  max good", "low": "  median good"}
    right_labels = [(kind, format_value(v) + right_text[kind]) for kind, v in scale_ticks]
    thr_label = ""
    if math.isfinite(thr):
        thr_label = format_value(thr)
        if thr > top:
            thr_label = "^ " + thr_label
        elif thr < low:
            thr_label = "v " + thr_label
    left_w = max(_text_box(probe, t, font)[0] for t in ("pixel", "threshold", thr_label or "x")) + tick_w + 4
    right_w = max(_text_box(probe, t, font)[0] for _, t in right_labels) + tick_w + 6
    x_bar = 4 + left_w
    width = x_bar + bar_w + right_w + 4
    canvas = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(canvas)
    # the ramp: each row coloured as a map value equal to the row's value
    values = top - (np.arange(n_rows, dtype=np.float64) / max(n_rows - 1, 1)) * (top - low)
    ramp = heatmap(values[:, None].repeat(bar_w, axis=1), calibration)
    strip = np.asarray(canvas).copy()
    strip[y0:y1, x_bar : x_bar + bar_w] = ramp
    canvas = Image.fromarray(strip)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x_bar - 1, y0 - 1, x_bar + bar_w, y1), outline=_INK)
    ticks: list[Tick] = []
    text_h = _text_box(probe, "0123456789", font)[1]
    for (kind, value), (_, label) in zip(scale_ticks, right_labels):
        r = row_of(value)
        draw.line((x_bar + bar_w, r, x_bar + bar_w + tick_w, r), fill=_INK)
        ty = min(max(r - text_h // 2, top_margin), height - text_h - 1)
        _put_text(draw, (x_bar + bar_w + tick_w + 3, ty), label, font, _INK)
        ticks.append(Tick(kind, value, format_value(value), r))
    if math.isfinite(thr):
        r = row_of(thr)
        thick = max(2, size // 6)
        draw.line((x_bar - tick_w, r, x_bar + bar_w - 1, r), fill=_THRESHOLD_INK, width=thick)
        lines = ["pixel", "threshold", thr_label]
        line_h = _text_box(probe, "Apg0", font)[1] + max(2, size // 5)
        block = len(lines) * line_h
        ty = min(max(r - block + line_h // 2 + text_h // 2, top_margin), height - block)  # the number by the line
        for i, line in enumerate(lines):
            w = _text_box(probe, line, font)[0]
            _put_text(draw, (x_bar - tick_w - 3 - w, ty + i * line_h), line, font, _THRESHOLD_INK)
        ticks.append(Tick("pixel threshold", thr, format_value(thr), r))
    return np.asarray(canvas, dtype=np.uint8).copy(), Layout((x_bar, y0, x_bar + bar_w, y1), tuple(ticks))


def labelled_panels(
    panels: Sequence[tuple[str, np.ndarray]], calibration: Calibration, gap: int = 4, scale: bool = True
) -> tuple[np.ndarray, Layout]:
    """Pictures of one size side by side, each under its title, then (with ``scale``) the :func:`colour_bar`.

    ``panels``: (title, uint8 HxWx3) pairs; the colour bar's title says its numbers are anomaly-map values.
    Returns the picture (uint8) and its :class:`Layout` (the bar's ticks in the picture's rows).
    """
    if not panels:
        raise ValueError("labelled_panels needs at least one panel")
    h, _ = panels[0][1].shape[:2]
    size = font_size(h)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = _text_box(probe, "Ag", font)[1] + size // 2 + 4
    pieces: list[np.ndarray] = []
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    x = 0
    for title, rgb in panels:
        if rgb.shape[0] != h:
            raise ValueError(f"panel {title!r} is {rgb.shape[0]} rows tall, the first {h}")
        if pieces:
            pieces.append(np.full((h + title_h, gap, 3), 255, dtype=np.uint8))
            x += gap
        column = np.full((h + title_h, rgb.shape[1], 3), 255, dtype=np.uint8)
        column[title_h:] = rgb
        pieces.append(column)
        boxes.append((title, (x, title_h, x + rgb.shape[1], title_h + h)))
        x += rgb.shape[1]
    bar_layout = None
    if scale:
        strip, bar_layout = colour_bar(calibration, h + title_h, top_margin=title_h)
        pieces.append(np.full((h + title_h, gap, 3), 255, dtype=np.uint8))
        x += gap
        pieces.append(strip)
    canvas = Image.fromarray(np.concatenate(pieces, axis=1))
    draw = ImageDraw.Draw(canvas)
    titles = [(t, b[0], b[2]) for t, b in boxes]
    if bar_layout is not None:
        titles.append(("anomaly map", x, canvas.width))
    for title, left, right in titles:
        fitted, w = font, _text_box(probe, title, font)[0]
        for smaller in range(size - 1, 7, -1):  # a narrow panel's title shrinks to fit it
            if w <= right - left:
                break
            fitted = _font(smaller)
            w = _text_box(probe, title, fitted)[0]
        _put_text(draw, (left + max(0, (right - left - w) // 2), 2 + size // 4), title, fitted, _INK)
    out = np.asarray(canvas, dtype=np.uint8).copy()
    if bar_layout is None:
        return out, Layout((0, 0, 0, 0), (), tuple(boxes))
    bl, bt, br, bb = bar_layout.bar
    return out, Layout((bl + x, bt, br + x, bb), bar_layout.ticks, tuple(boxes))


def heatmap_with_scale(amap: np.ndarray, calibration: Calibration) -> np.ndarray:
    """The heat map under the title "heat map", with the model's colour bar beside it (uint8)."""
    return labelled_panels([("heat map", heatmap(amap, calibration))], calibration)[0]


def side_by_side(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, calibration: Calibration) -> np.ndarray:
    """image | overlay (the mask's outline in white) | heat map, titled, with the model's colour bar (uint8).

    ``image``: float HxWx3 in [0,1]; ``amap`` and ``mask`` at the image's size (``mask`` None: no outline).
    The one-picture view of a prediction (what ``anomnet predict`` can write per image).
    """
    rgb = (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    over = overlay(image, amap, calibration)
    if mask is not None:
        over = draw_contour(over, mask)
    panels = [("image", rgb), ("overlay", over), ("heat map", heatmap(amap, calibration))]
    return labelled_panels(panels, calibration)[0]
