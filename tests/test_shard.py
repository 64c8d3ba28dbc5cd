"""`predict --shard i/N`: every input in exactly one shard, independent of listing order; clear errors for bad i/N."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet.cli import EXIT_INPUT, EXIT_OK, main
from anomnet.decisions.calibration import Calibration
from anomnet.errors import ConfigError
from anomnet.predict.inputs import InputImage, collect_inputs
from anomnet.predict.outputs import predict_images
from anomnet.predict.shard import Shard


class FakeScorer:
    """Score = mean brightness; map = the red channel (no torch, no model folder)."""

    batch_size = 3

    def __init__(self) -> None:
        self.calibration = Calibration(validation_scores=[0.1, 0.2, 0.3], threshold=0.5, pixel_threshold=0.5)

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images.mean(axis=(1, 2, 3)).astype(np.float64), images[..., 0].astype(np.float32)


def _images(root: Path, n: int) -> Path:
    for i in range(n):
        folder = root / f"cam{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_list_whatever_its_order(count: int) -> None:
    items = [InputImage(Path(f"/d/{i % 5}/{i:03d}.png"), f"{i % 5}/{i:03d}") for i in range(23)]
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    parts = [Shard(i, count).select(items) for i in range(count)]
    assert sorted(x.name for p in parts for x in p) == sorted(x.name for x in items)  # each exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    for i in range(count):  # membership does not depend on the order the file system listed the files in
        assert {x.name for x in Shard(i, count).select(shuffled)} == {x.name for x in parts[i]}
    # a shard keeps the given order
    assert parts[0] == [x for x in items if x in parts[0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "between 0 and 2"),
        ("-1/4", "between 0 and 3"),
        ("0/0", "at least 1"),
        ("1", "expected i/N"),
        ("a/b", "expected i/N"),
        ("1/2/3", "expected i/N"),
    ],
)
def test_bad_shard_specs_are_refused_with_the_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Shard.parse(text)


def test_parse_accepts_spaces_and_prints_back() -> None:
    assert Shard.parse(" 2 / 5 ") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"


def test_sharded_predict_writes_each_image_once_with_whole_list_names(tmp_path: Path) -> None:
    data = _images(tmp_path / "in", 10)
    whole = {i.name for i in collect_inputs([data])}
    out = tmp_path / "out"
    seen: list[str] = []
    for i in range(3):
        rows = predict_images(FakeScorer(), [data], out / f"shard{i}", shard=Shard(i, 3))
        seen += [Path(r.path).relative_to(data).with_suffix("").as_posix() for r in rows]
        for r in rows:  # outputs named as in the whole list: cam<k>/<stem>
            assert Path(r.outputs["mask"]).relative_to(out / f"shard{i}" / "masks").with_suffix("").as_posix() in whole
    assert sorted(seen) == sorted(whole)


def test_cli_shards_cover_the_inputs(tmp_path: Path, folder_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    fit = ["fit", "--data", str(folder_dataset), "--out", str(model), "--image-size", "64", "--quiet"]
    assert main([*fit, "--set", "batch_size=4"]) == EXIT_OK
    capsys.readouterr()
    images = str(folder_dataset / "test")
    paths: list[str] = []
    for i in range(2):
        assert main(["predict", "--model-dir", str(model), images, "--quiet", "--shard", f"{i}/2"]) == EXIT_OK
        lines = capsys.readouterr().out.strip().splitlines()[1:]
        paths += [line.split("\t")[0] for line in lines]
    assert sorted(paths) == sorted(str(i.path) for i in collect_inputs([images]))
    assert len(paths) == len(set(paths)) == 8


def test_cli_bad_shard_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model-dir", str(tmp_path / "m"), str(tmp_path), "--shard", "2/2"]) == EXIT_INPUT
    assert "--shard 2/2: the shard index must be between 0 and 1" in capsys.readouterr().err
