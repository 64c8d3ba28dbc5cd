"""`anomnet predict --out`: the files it writes, a corrupt file among good ones, stdin input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomnet import api
from anomnet.cli import EXIT_OK, EXIT_SOME_FAILED, main
from anomnet.predict.inputs import collect_inputs

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


@pytest.fixture
def model_dir(folder_dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    assert (
        main(
            [
                "fit",
                "--data",
                str(folder_dataset),
                "--out",
                str(out),
                "--pixel-false-alarm",
                "0.01",
                "--min-area",
                "3",
                *SMALL,
            ]
        )
        == EXIT_OK
    )
    return out


def test_predict_folder_with_one_corrupt_file(model_dir: Path, folder_dataset: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for f in sorted((folder_dataset / "test" / "blob").glob("*.png"))[:2]:
        (images / f.name).write_bytes(f.read_bytes())
    good = sorted((folder_dataset / "test" / "good").glob("*.png"))[0]
    (images / "sub" / good.name).write_bytes(good.read_bytes())
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(images / "sub" / "wide.png")  # another size
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"

    code = main(["predict", "--model-dir", str(model_dir), str(images), "--out", str(out), "--raw-maps", "--quiet"])
    assert code == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert "1 of 5 images could not be read" in err

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 5
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["score"] == ""
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 4 and all(r["score"] and r["p_value"] and r["defective"] in ("True", "False") for r in ok)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [r["path"] for r in rows]

    names = {"b000", "b001", "sub/g000", "sub/wide"} if (images / "b000.png").exists() else None
    written = {p.relative_to(out / "masks").with_suffix("").as_posix() for p in (out / "masks").rglob("*.png")}
    assert len(written) == 4 and (names is None or written == names)
    assert not any("broken" in n for n in written)
    for rec in records:
        if rec["error"]:
            assert rec["outputs"] == {}
            continue
        size = Image.open(rec["path"]).size
        for kind in ("heatmap", "overlay", "mask", "map"):
            assert Path(rec["outputs"][kind]).is_file()
        mask = np.array(Image.open(rec["outputs"]["mask"]))
        assert mask.shape == size[::-1] and set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == rec["defect_pixels"]
        assert Image.open(rec["outputs"]["overlay"]).size == size and Image.open(rec["outputs"]["heatmap"]).size == size
        raw = tifffile.imread(rec["outputs"]["map"])
        assert raw.dtype == np.float32 and raw.shape == size[::-1]

    # the raw map is the model's map, and the mask is that map at the saved pixel threshold
    # (scored in the same batches as above: a batch of another make-up may differ in the last float bits)
    one = next(r for r in records if r["path"].endswith("b000.png"))
    direct = next(p for p in api.predict(model_dir, [images], keep_maps=True) if p.path == one["path"])
    assert np.array_equal(tifffile.imread(one["outputs"]["map"]), direct.anomaly_map)
    assert np.array_equal(np.array(Image.open(one["outputs"]["mask"])) > 0, direct.mask)
    assert direct.score == pytest.approx(float(one["score"]))


def test_paths_from_stdin_and_name_clashes(
    model_dir: Path, folder_dataset: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    a = next((folder_dataset / "test" / "good").glob("*.png"))
    other = tmp_path / "other"
    other.mkdir()
    (other / a.name).write_bytes(a.read_bytes())
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{a}\n\n{other / a.name}\n"))
    out = tmp_path / "out"
    assert main(["predict", "--model-dir", str(model_dir), "-", "--out", str(out), "--quiet"]) == EXIT_OK
    stdout = capsys.readouterr().out
    assert stdout.count(a.name) == 2
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == sorted([f"{a.stem}.png", f"{a.stem}__2.png"])
    assert not (out / "maps").exists()  # raw maps only when asked


def test_collect_inputs_keeps_subfolders(tmp_path: Path) -> None:
    (tmp_path / "d" / "x").mkdir(parents=True)
    for p in ("d/a.png", "d/x/a.png", "d/x/b.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / p)
    items = collect_inputs([tmp_path / "d", tmp_path / "d" / "a.png"])
    assert [i.name for i in items] == ["a", "x/a", "x/b", "a__2"]


def test_predict_inputs_keep_paths_as_given_and_list_twice_twice(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "d").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "d" / "a.png")
    monkeypatch.chdir(tmp_path)
    items = collect_inputs(["./d/a.png", "d/a.png", "d/*.png", "m.csv"])  # globs and manifests: --engine ray only
    assert [(i.path, i.name) for i in items] == [
        ("d/a.png", "a"),
        ("d/a.png", "a__2"),
        ("d/*.png", "*"),
        ("m.csv", "m"),
    ]
    batch = collect_inputs(["./d/a.png", "d/a.png", "d/*.png"], batch=True)
    assert [(i.path, i.name) for i in batch] == [(str(tmp_path / "d" / "a.png"), "a")]


def test_predict_writes_the_models_colour_scale_once(model_dir: Path, folder_dataset: Path, tmp_path: Path) -> None:
    from anomnet.predict.outputs import COLOUR_SCALE, COLOUR_SCALE_HEIGHT
    from anomnet.predict.visualize import colour_bar

    out = tmp_path / "out"
    good = sorted((folder_dataset / "test" / "good").glob("*.png"))[:2]
    assert main(["predict", "--model-dir", str(model_dir), *map(str, good), "--out", str(out), "--quiet"]) == EXIT_OK
    legend = np.asarray(Image.open(out / COLOUR_SCALE).convert("RGB"))
    expected, layout = colour_bar(api.load(model_dir).calibration, COLOUR_SCALE_HEIGHT)
    assert legend.shape[0] == COLOUR_SCALE_HEIGHT and np.array_equal(legend, expected)
    assert {t.kind for t in layout.ticks} >= {"low", "high"}
    assert COLOUR_SCALE in json.loads((out / ".anomnet-outputs.json").read_text())["files"]  # a re-run replaces it
