"""High-resolution tiling: the tile grid, the stitching, and tiled fit / predict / save / load for every detector."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomnet import api, data, tiling
from anomnet.cli import EXIT_OK, main
from anomnet.data import Sample, load_dataset
from anomnet.detectors import DETECTORS, Detector, DetectorConfig, create_detector
from anomnet.errors import ConfigError
from anomnet.evaluation.evaluate import evaluate


class GrayDetector(Detector):
    """Test double: the map of a preprocessed tile is its gray value, the score its sum."""

    name = "gray-test"

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample], progress: bool = True) -> None:
        self.seen = sum(len(b) for b in self.training_batches(train))

    def predict_preprocessed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = images.mean(1)
        return maps.sum((1, 2)), maps

    model = torch.nn.Module()  # no state: always fitted


def gray(**settings: object) -> GrayDetector:
    # predicts without a fit, so nothing decides aspect=auto: the setting is stated
    return GrayDetector(DetectorConfig.from_dict({"batch_size": 5, "aspect": "stretch", **settings}))


# -- the grid ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 3000), tile=st.integers(32, 700), overlap=st.floats(0.0, 0.95))
def test_axis_tiles_cover_the_axis_exactly(length: int, tile: int, overlap: float) -> None:
    starts = tiling.axis_starts(length, tile, overlap)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length
    assert all(b > a for a, b in zip(starts, starts[1:]))  # no tile twice
    covered = torch.zeros(length, dtype=torch.int32)
    for s in starts:
        assert s >= 0 and s + t <= length
        covered[s : s + t] += 1
    assert bool((covered >= 1).all())
    # neighbours overlap at least as asked (up to one pixel of rounding), and no tile is redundant
    step = math.ceil(t * (1.0 - overlap))
    assert all(b - a <= max(1, step) for a, b in zip(starts, starts[1:]))
    # and no more tiles than that needs: with one fewer, evenly spread, neighbours would be more than a stride apart
    n = len(starts)
    if n >= 3:
        assert (length - t) / (n - 2) > max(1.0, t * (1.0 - overlap)) - 1e-6


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 900), w=st.integers(1, 900), tile=st.integers(32, 400), overlap=st.floats(0.0, 0.9))
def test_tile_grid_covers_the_image_exactly(h: int, w: int, tile: int, overlap: float) -> None:
    boxes = tiling.tile_grid((h, w), tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.int32)
    for y, x, th, tw in boxes:
        assert (th, tw) == (min(tile, h), min(tile, w))
        assert y >= 0 and y + th <= h and x >= 0 and x + tw <= w
        covered[y : y + th, x : x + tw] += 1
    assert int(covered.min()) >= 1
    assert len(boxes) == tiling.count_tiles((h, w), tiling.Tiling(max(tile, 32), overlap))


def test_known_grid_of_a_bottle_image() -> None:
    assert tiling.axis_starts(900, 256, 0.25) == [0, 161, 322, 483, 644]  # 5 tiles, stride <= 192
    assert tiling.axis_starts(900, 512, 0.25) == [0, 194, 388]  # two would overlap by 124 px < 25 %
    assert tiling.axis_starts(256, 256, 0.25) == [0]
    assert tiling.axis_starts(100, 256, 0.25) == [0]  # smaller than a tile: one tile of the whole axis


def test_window_is_positive_symmetric_and_peaks_in_the_middle() -> None:
    for n in (1, 2, 7, 64):
        w = tiling.window(n)
        assert bool((w > 0).all()) and torch.allclose(w, w.flip(0))
        assert float(w.max()) <= 1.0 and float(w[n // 2]) == float(w.max())


# -- stitching ---------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.5), (1.0, 0.5, 0.37), (1.5, 0.8)])
@pytest.mark.parametrize("hw", [(300, 170), (64, 64), (97, 251)])
def test_stitched_map_of_a_constant_image_is_constant(scales: tuple[float, ...], hw: tuple[int, int]) -> None:
    det = gray(image_size=48, tile=64, tile_overlap=0.3, tile_scales=scales)
    images = torch.full((2, 3, *hw), 0.3)
    images[1] = 0.7
    pred = det.predict(images)
    assert pred.maps.shape == (2, *hw)
    assert torch.allclose(pred.maps[0], torch.tensor(0.3), atol=1e-5)
    assert torch.allclose(pred.maps[1], torch.tensor(0.7), atol=1e-5)


def test_stitching_puts_every_tile_back_in_its_place() -> None:
    # tiles fed at their own size (image_size == tile) and one scale: the stitched gray map is the gray image
    image = torch.rand(1, 3, 150, 211, generator=torch.Generator().manual_seed(0))
    det = gray(image_size=64, tile=64, tile_overlap=0.4)
    assert torch.allclose(det.predict(image).maps[0], image[0].mean(0), atol=1e-5)


def test_seams_are_blended_not_cut() -> None:
    # two tiles that disagree (left tile says 0, right tile says 1) meet in a smooth ramp, not a step
    maps = torch.stack([torch.zeros(32, 32), torch.ones(32, 32)])
    out = tiling.stitch(maps, [(0, 0, 32, 32), (0, 16, 32, 32)], (32, 48))
    row = out[16]
    assert float(row[:16].max()) == 0.0 and float(row[32:].min()) == 1.0
    middle = row[16:32]
    assert bool((middle[1:] - middle[:-1] > 0).all())  # monotone, no jump at either tile edge
    assert float((middle[1:] - middle[:-1]).max()) < 0.2


def test_image_score_modes() -> None:
    image = torch.rand(1, 3, 100, 100, generator=torch.Generator().manual_seed(1))
    by_map = gray(image_size=32, tile=40).predict(image)
    assert float(by_map.scores[0]) == float(by_map.maps[0].max())
    by_tile = gray(image_size=32, tile=40, tile_score="tile").predict(image)
    assert float(by_tile.scores[0]) > 32 * 32 * 0.3  # a tile's sum of gray values, not a map value
    assert torch.equal(by_map.maps, by_tile.maps)


def test_training_tiles_are_counted_and_streamed(folder_dataset) -> None:
    split = load_dataset(folder_dataset)
    det = gray(image_size=32, tile=40, tile_overlap=0.5, tile_scales="1,0.6")
    det.fit(split.train, split.validation, progress=False)
    per_image = tiling.count_tiles((64, 64), det.tiling)
    assert per_image == 9 + 1  # 3x3 tiles of 40 px at scale 1; one 38 px tile at 0.6
    assert det.seen == det.training_count(split.train) == per_image * len(split.train)
    assert all(len(b) <= 5 for b in det.training_batches(split.train))
    plain = gray(image_size=32)
    plain.fit(split.train, split.validation, progress=False)
    assert plain.seen == plain.training_count(split.train) == len(split.train)


@pytest.mark.parametrize(
    "bad",
    [
        {"tile": 16},
        {"tile": 64, "tile_overlap": 1.0},
        {"tile": 64, "tile_scales": "1,0"},
        {"tile": 64, "tile_scales": "1,1"},
        {"tile": 64, "tile_score": "mean"},
        {"tile": -5},
    ],
)
def test_bad_tiling_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        create_detector("patchcore", bad)


# -- real detectors ----------------------------------------------------------------------

# Small, fast settings per detector (a detector not listed here runs with its defaults at 64 px).
TINY = {
    "patchcore": {},
    "anomnet": {"num_centroids": 8, "epochs1": 1, "epochs2": 1, "init_samples": 500},
    "tocoad": {"train_batch": 4, "steps1": 2, "steps2": 2, "stage2": True},
    "efficientad": {"steps": 2, "distill_steps": 1, "distill_crop": 64, "distill_batch": 4, "pool_limit": 4},
}
TILED = {"image_size": 64, "batch_size": 8, "tile": 48, "tile_overlap": 0.5, "tile_scales": "1,0.5"}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_trains_on_tiles_and_saves_its_tiling(name: str, folder_dataset, tmp_path, monkeypatch) -> None:
    tiles, whole = [], []
    real_batches, real_load = tiling.training_batches, data._load_one

    def spy_batches(*args, **kwargs):
        for b in real_batches(*args, **kwargs):
            tiles.append(len(b))
            yield b

    def spy_load(sample, target, with_masks):
        if target is not None:  # a tiled model reads images at their own size only, then cuts them
            whole.append(sample.path)
        return real_load(sample, target, with_masks)

    monkeypatch.setattr(tiling, "training_batches", spy_batches)
    monkeypatch.setattr(data, "_load_one", spy_load)
    split = load_dataset(folder_dataset)
    det = api.fit(name, split, tmp_path / "m", settings={**TINY.get(name, {}), **TILED}, progress=False)
    per_image = 4 + 1  # 2x2 tiles of 48 px at scale 1, one tile of the whole 32 px image at 0.5
    assert sum(tiles) >= per_image * len(split.train), (
        f"{name}.fit does not read its images through Detector.training_batches"
    )
    assert not whole, f"{name}.fit read whole images resized, not tiles (use Detector.training_batches)"
    loaded = Detector.load(tmp_path / "m")
    assert loaded.tiling == det.tiling == tiling.Tiling(48, 0.5, (1.0, 0.5), "map")
    x = torch.rand(2, 3, 80, 72, generator=torch.Generator().manual_seed(2))
    a, b = det.predict(x), loaded.predict(x)
    assert a.maps.shape == (2, 80, 72)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_tiled_patchcore_finds_the_defects(folder_dataset, tmp_path) -> None:
    split = load_dataset(folder_dataset)
    det = api.fit(
        "patchcore",
        split,
        None,
        settings={"image_size": 32, "batch_size": 8, "tile": 32, "tile_overlap": 0.5},
        progress=False,
    )
    tiles = 9 * len(split.train)
    patches = tiles * 4 * 4  # 4x4 patches per 32 px tile
    assert det.memory_bank is not None and det.memory_bank.shape[0] == round(0.1 * patches)
    res = evaluate(det, split.test, progress=False)
    assert res.metrics["image_auroc"] == 1.0
    assert res.metrics["pixel_auroc"] > 0.9


def test_cli_fit_with_tiling_writes_it_into_the_model(folder_dataset, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    args = [
        "fit",
        "--data",
        str(folder_dataset),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--quiet",
        "--tile",
        "32",
        "--tile-scales",
        "1,0.5",
        "--set",
        "tile_overlap=0.5",
    ]
    assert main(args) == EXIT_OK
    config = json.loads((out / "anomnet.json").read_text())["config"]
    saved = (config["tile"], config["tile_scales"], config["tile_overlap"], config["tile_score"])
    assert saved == (32, [1.0, 0.5], 0.5, "map")
    assert main(["predict", "--model-dir", str(out), str(folder_dataset / "test" / "blob")]) == EXIT_OK
    assert capsys.readouterr().out.count("DEFECTIVE") == 4
