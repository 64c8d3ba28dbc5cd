"""Heat maps that explain themselves: the colour bar's numbers are the model's scale, panels carry titles."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from anomnet.decisions.calibration import Calibration
from anomnet.predict.visualize import (
    colour_bar,
    format_value,
    heatmap,
    heatmap_with_scale,
    labelled_panels,
    overlay,
    scale_range,
)

WHITE = np.array([255, 255, 255])


def _cal(low: float = 0.12, high: float = 0.85, thr: float = 1.07) -> Calibration:
    return Calibration(map_low=low, map_high=high, pixel_threshold=thr)


def _assert_ramp_shows(
    picture: np.ndarray, bar: tuple[int, int, int, int], cal: Calibration, row: int, value: float
) -> None:
    """The ramp's colour on ``row`` is the heat map's colour of the ramp's value there (within half a row of
    ``value``)."""
    left, top_row, right, bottom = bar
    low, top = scale_range(cal)
    step = (top - low) / (bottom - top_row - 1)
    row_value = top - (row - top_row) * step
    assert abs(row_value - value) <= step / 2 + 1e-9, (row, row_value, value)
    expected = heatmap(np.array([[row_value]]), cal)[0, 0]
    assert np.array_equal(picture[row, (left + right) // 2], expected), (
        row,
        picture[row, (left + right) // 2],
        expected,
    )


@pytest.mark.parametrize("height", [64, 300])
def test_colour_bar_numbers_are_the_models_scale(height: int) -> None:
    cal = _cal()
    strip, layout = colour_bar(cal, height)
    assert strip.dtype == np.uint8 and strip.shape[0] == height
    ticks = {t.kind: t for t in layout.ticks}
    assert set(ticks) == {"top", "high", "low", "pixel threshold"}
    expected = {"low": 0.12, "high": 0.85, "top": 0.12 + 2 * (0.85 - 0.12), "pixel threshold": 1.07}
    for kind, value in expected.items():
        assert ticks[kind].value == pytest.approx(value, rel=1e-12)
        assert ticks[kind].label == format_value(value)
        assert float(ticks[kind].label) == pytest.approx(value, rel=1e-3)  # the number a person reads
    # higher values higher up; the ramp spans exactly low..top
    assert ticks["top"].row < ticks["pixel threshold"].row < ticks["high"].row < ticks["low"].row
    left, top_row, right, bottom = layout.bar
    assert ticks["top"].row == top_row and ticks["low"].row == bottom - 1
    assert ticks["high"].row == pytest.approx((top_row + bottom - 1) / 2, abs=1)
    # the ramp's colour on each tick's row is the heat map's colour of a value within half a row of the tick's
    for tick in layout.ticks:
        if tick.kind != "pixel threshold":  # (the threshold's line is drawn over the ramp)
            _assert_ramp_shows(strip, layout.bar, cal, tick.row, tick.value)
    # every number is drawn beside its tick: ink right of the ramp on the tick's row
    for kind in ("top", "high", "low"):
        row = strip[ticks[kind].row, right + 1 :]
        assert (row != WHITE).any(axis=-1).sum() >= 3, kind


def test_the_ramp_is_the_heat_map_scale_row_by_row() -> None:
    cal = _cal(low=-2.0, high=3.0, thr=100.0)  # threshold above the scale
    strip, layout = colour_bar(cal, 200)
    left, top_row, right, bottom = layout.bar
    low, top = scale_range(cal)
    values = top - np.arange(bottom - top_row) / (bottom - top_row - 1) * (top - low)
    # an off-scale threshold is marked at the end of the ramp
    thr = layout.tick("pixel threshold")
    assert thr is not None and thr.value == 100.0 and thr.row == top_row and thr.label == "100"
    below = thr.row + 5 - top_row  # rows clear of the threshold's line
    ramp = strip[top_row:bottom, (left + right) // 2]
    assert np.array_equal(ramp[below:], heatmap(values[:, None], cal)[below:, 0])


def test_no_pixel_threshold_no_mark() -> None:
    _, layout = colour_bar(_cal(thr=math.inf), 120)
    assert layout.tick("pixel threshold") is None and len(layout.ticks) == 3


def test_labelled_panels_keep_the_pictures_and_title_them() -> None:
    cal = _cal()
    rng = np.random.default_rng(0)
    image = rng.random((64, 80, 3))
    amap = rng.random((64, 80)) * 1.5
    panels = [
        ("image", (image * 255).astype(np.uint8)),
        ("overlay", overlay(image, amap, cal)),
        ("heat map", heatmap(amap, cal)),
    ]
    picture, layout = labelled_panels(panels, cal)
    assert [t for t, _ in layout.panels] == ["image", "overlay", "heat map"]
    for (title, rgb), (_, (left, top, right, bottom)) in zip(panels, layout.panels):
        assert np.array_equal(picture[top:bottom, left:right], rgb), title
        assert (picture[:top, left:right] != WHITE).any(), f"no title above {title}"
    # the bar's ticks are given in the picture's own rows and columns
    left, top, right, bottom = layout.bar
    assert left > layout.panels[-1][1][2] and picture.shape[0] == 64 + layout.panels[0][1][1]
    high = layout.tick("high")
    assert high is not None and high.label == format_value(0.85)
    _assert_ramp_shows(picture, layout.bar, cal, high.row, 0.85)
    with pytest.raises(ValueError, match="rows tall"):
        labelled_panels([("a", panels[0][1]), ("b", panels[0][1][:10])], cal)


def test_heatmap_with_scale_is_the_heat_map_and_its_bar() -> None:
    cal = _cal()
    amap = np.linspace(0, 2, 64 * 64).reshape(64, 64)
    picture = heatmap_with_scale(amap, cal)
    _, layout = labelled_panels([("heat map", heatmap(amap, cal))], cal)
    ((_, (left, top, right, bottom)),) = layout.panels
    assert np.array_equal(picture[top:bottom, left:right], heatmap(amap, cal))
    assert picture.shape[1] > 64 + 40  # the colour bar and its numbers


def test_visualize_needs_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, numpy as np; from anomnet.decisions.calibration import Calibration; "
        "from anomnet.predict import visualize; "
        "visualize.heatmap_with_scale(np.zeros((32, 32)), Calibration(pixel_threshold=0.5)); "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_test_heatmaps_are_titled_panels_with_the_colour_bar(folder_dataset, tmp_path) -> None:
    """``anomnet test --heatmaps``: image | overlay | heat map | ground truth under titles, then the bar."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    from anomnet import api, imageio
    from anomnet.data import Sample

    cal = _cal(low=0.0, high=0.5, thr=0.75)
    amap = np.linspace(0.0, 1.5, 64 * 64, dtype=np.float32).reshape(64, 64)
    detector = SimpleNamespace(
        calibration=cal, predict=lambda x: SimpleNamespace(maps=torch.from_numpy(amap)[None].expand(len(x), 64, 64))
    )
    image = folder_dataset / "test" / "blob" / "b000.png"
    samples = [Sample(image, 1, folder_dataset / "masks" / "b000.png", "blob")]
    (written,) = api.write_heatmaps(detector, samples, tmp_path)  # type: ignore[arg-type]  # a stand-in detector
    picture = np.asarray(Image.open(written).convert("RGB"))
    rgb = imageio.read_image(image)
    mask = imageio.read_mask(folder_dataset / "masks" / "b000.png", (64, 64))
    panels = [
        ("image", (rgb * 255 + 0.5).astype(np.uint8)),
        ("overlay", overlay(rgb, amap, cal)),
        ("heat map", heatmap(amap, cal)),
        ("ground truth", np.repeat((mask[..., None] * 255).astype(np.uint8), 3, axis=2)),
    ]
    expected, layout = labelled_panels(panels, cal)
    assert np.array_equal(picture, expected)
    assert [t.label for t in layout.ticks] == ["1", "0.5", "0", "0.75"]


@pytest.mark.parametrize("thr", [100.0, -100.0, 0.5])
def test_the_bar_leaves_its_title_rows_free(thr: float) -> None:
    """Labels stay below ``top_margin`` (where labelled_panels writes the bar's title), whatever the threshold."""
    for height in (64, 200):
        strip, _ = colour_bar(_cal(low=-2.0, high=3.0, thr=thr), height, top_margin=20)
        assert (strip[:20] == 255).all() and (strip[20:] != 255).any()


def test_side_by_side_is_image_overlay_and_heat_map_with_the_bar() -> None:
    from anomnet.predict.visualize import draw_contour, side_by_side

    cal = _cal()
    rng = np.random.default_rng(1)
    image = rng.random((48, 40, 3))
    amap = rng.random((48, 40)) * 1.5
    mask = amap > 1.07
    picture = side_by_side(image, amap, mask, cal)
    expected, layout = labelled_panels(
        [
            ("image", (image * 255 + 0.5).astype(np.uint8)),
            ("overlay", draw_contour(overlay(image, amap, cal), mask)),
            ("heat map", heatmap(amap, cal)),
        ],
        cal,
    )
    assert np.array_equal(picture, expected)
    assert [t.label for t in layout.ticks] == [format_value(v) for v in (1.58, 0.85, 0.12, 1.07)]
    assert not np.array_equal(side_by_side(image, amap, None, cal), picture)  # no mask: no outline
