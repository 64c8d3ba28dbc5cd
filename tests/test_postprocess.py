"""Mask post-processing on small hand-made masks, and the map made consistent with it."""

from __future__ import annotations

import numpy as np
import pytest

from anomnet.decisions.postprocess import MaskPostprocess, close, count_regions, disk, postprocess_map
from anomnet.errors import ConfigError
from anomnet.predict.visualize import draw_contour


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


def test_nothing_enabled_returns_the_mask_unchanged() -> None:
    m = np.random.default_rng(0).random((9, 9)) > 0.6
    assert not MaskPostprocess().enabled
    assert np.array_equal(MaskPostprocess().apply(m), m)


def test_closing_joins_a_one_pixel_gap() -> None:
    m = _mask(
        [
            ".........",
            ".###.###.",
            ".###.###.",
            ".###.###.",
            ".........",
        ]
    )
    out = MaskPostprocess(closing=1).apply(m)
    assert out[2, 4] and not out[1, 4] and not out[3, 4]  # the gap is bridged (a disk rounds the corners)
    assert count_regions(out) == 1 and count_regions(m) == 2
    assert np.array_equal(out & m, m)  # closing never removes pixels
    assert not out[0].any() and not out[4].any() and not out[:, 0].any() and not out[:, 8].any()


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_fast_closing_equals_scipy_closing_of_the_padded_mask(radius: int) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(radius)
    for density in (0.05, 0.3, 0.7):
        m = rng.random((30, 41)) < density
        p = np.pad(m, radius)
        expected = ndimage.binary_closing(p, structure=disk(radius))[radius:-radius, radius:-radius]
        assert np.array_equal(close(m, radius), expected)
    assert close(np.ones((5, 5), bool), 2).all()


def test_closing_keeps_regions_at_the_image_border() -> None:
    m = np.zeros((10, 10), dtype=bool)
    m[0:4, 0:3] = True  # touches the top-left corner
    m[6:10, 8:10] = True  # touches the bottom-right corner
    out = MaskPostprocess(closing=2).apply(m)
    assert np.array_equal(out, m)  # nothing eaten at the border, nothing to close


def test_fill_holes_fills_enclosed_background_only() -> None:
    m = _mask(
        [
            "#####....",
            "#...#....",
            "#.#.#..##",
            "#...#..#.",
            "#####..#.",
        ]
    )
    out = MaskPostprocess(fill_holes=True).apply(m)
    assert out[1:4, 1:4].all()  # the hole of the ring (with its island) is filled
    assert not out[3:5, 8].any()  # open to the border: not a hole
    assert out.sum() == 25 + m[:, 5:].sum()


def test_min_area_drops_small_8_connected_regions() -> None:
    m = _mask(
        [
            "#.......",
            ".#......",
            "....####",
            "....####",
            "##......",
        ]
    )
    # the diagonal pair is one 8-connected region of 2 px; the block has 8 px; the bottom pair 2 px
    assert count_regions(m) == 3
    out = MaskPostprocess(min_area=3).apply(m)
    assert np.array_equal(out, m & np.pad(np.ones((2, 4), bool), ((2, 1), (4, 0))))
    assert np.array_equal(MaskPostprocess(min_area=2).apply(m), m)


def test_closing_runs_before_min_area() -> None:
    m = _mask(
        [
            "..........",
            ".###.###..",
            ".###.###..",
            ".###.###..",
            "..........",
        ]
    )  # two 9-px fragments with a 1-px gap
    assert not MaskPostprocess(min_area=12).apply(m).any()
    out = MaskPostprocess(closing=1, min_area=12).apply(m)
    assert out.sum() == 19 and count_regions(out) == 1


def test_postprocessed_map_thresholds_to_the_cleaned_mask() -> None:
    rng = np.random.default_rng(1)
    amap = rng.random((40, 40)).astype(np.float32)
    t = 0.9
    settings = MaskPostprocess(closing=2, fill_holes=True, min_area=5)
    mask, new = postprocess_map(amap, t, settings)
    assert np.array_equal(mask, settings.apply(amap >= t))
    assert np.array_equal(new >= t, mask)
    changed = new != amap
    assert changed.any()
    assert np.array_equal(changed, (amap >= t) != mask)  # only pixels whose decision changed move
    raw, same = postprocess_map(amap, t, MaskPostprocess())
    assert np.array_equal(raw, amap >= t) and same is not None and np.array_equal(same, amap)


def test_settings_are_checked_and_round_trip() -> None:
    s = MaskPostprocess(closing=3, fill_holes=True, min_area=50)
    assert MaskPostprocess.from_dict(s.to_dict()) == s
    assert "closing r=3" in s.describe() and MaskPostprocess().describe() == "none"
    for bad in ({"closing": -1}, {"min_area": 2.5}, {"fill_holes": "yes"}):
        with pytest.raises(ConfigError):
            MaskPostprocess(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown"):
        MaskPostprocess.from_dict({"opening": 2})
    assert disk(1).sum() == 5 and disk(2).shape == (5, 5)


def test_contour_is_drawn_on_the_mask_boundary_only() -> None:
    rgb = np.zeros((12, 12, 3), dtype=np.uint8)
    m = np.zeros((12, 12), dtype=bool)
    m[3:9, 3:9] = True
    out = draw_contour(rgb, m, color=(255, 0, 255), width=1)
    drawn = (out == [255, 0, 255]).all(axis=2)
    ring = m.copy()
    ring[4:8, 4:8] = False
    assert np.array_equal(drawn, ring)
    assert np.array_equal(draw_contour(rgb, np.zeros_like(m)), rgb)
