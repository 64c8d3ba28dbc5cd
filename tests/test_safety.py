"""Regression tests: the tool never loses, mixes up or corrupts a user's files (each case was a real failure)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomnet import imageio
from anomnet.errors import DatasetError


def _png(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_symlink_loops_are_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _png(root / "a.png")
    _png(root / "sub" / "b.png")
    os.symlink(".", root / "x")
    os.symlink(".", root / "sub" / "y")
    result: list[Path] = []
    worker = threading.Thread(target=lambda: result.extend(imageio.list_images(root, recursive=True)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "listing a folder with a symlink loop did not finish"
    assert sorted(p.name for p in result) == ["a.png", "b.png"]


def test_symlinked_folder_outside_is_still_read(tmp_path: Path) -> None:
    other = tmp_path / "other"
    _png(other / "c.png")
    root = tmp_path / "imgs"
    _png(root / "a.png")
    os.symlink(other, root / "linked")
    assert sorted(p.name for p in imageio.list_images(root, recursive=True)) == ["a.png", "c.png"]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    data = np.zeros((4, 6, 3), np.uint8)
    data[0, :] = 255  # top row white as stored
    im = Image.fromarray(data)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=100)
    image = imageio.read_image(path)
    assert image.shape[:2] == (6, 4)
    assert imageio.image_size(path) == (6, 4)
    # the stored top row is the rightmost column once rotated clockwise
    assert image[:, -1].mean() > 0.8 and image[:, 0].mean() < 0.2


def test_missing_folder_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        imageio.list_images(tmp_path / "nope")


# ------------------------------------------------------------------ fitted-model cases

import json  # noqa: E402
import shutil  # noqa: E402

from anomnet import api  # noqa: E402
from anomnet.cli import EXIT_INPUT, EXIT_OK, main  # noqa: E402
from anomnet.detectors.base import Detector  # noqa: E402
from anomnet.errors import ConfigError, ModelFormatError  # noqa: E402
from anomnet.model_io import META_FILE, TENSOR_FILE  # noqa: E402
from anomnet.predict.inputs import collect_inputs  # noqa: E402

SMALL = {"image_size": 64}


@pytest.fixture
def fitted(folder_dataset: Path, tmp_path: Path) -> Path:
    api.fit("patchcore", folder_dataset, tmp_path / "model", settings=SMALL, progress=False)
    return tmp_path / "model"


def test_suffixed_names_never_equal_a_real_name(tmp_path: Path) -> None:
    a = _png(tmp_path / "a" / "x.png")
    b = _png(tmp_path / "b" / "x.png")
    real = _png(tmp_path / "c" / "x__2.png")
    names = [i.name for i in collect_inputs([a, b, real])]
    assert len(set(names)) == 3 and "x__2" in names
    assert dict(zip(names, [a, b, real]))["x__2"] == real  # the real x__2 keeps its own name


def test_reused_out_folder_keeps_no_stale_files(fitted: Path, folder_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    good = sorted((folder_dataset / "test" / "good").iterdir())
    api.predict(fitted, good[:2], out_dir=out)
    keep = out / "mine.txt"
    keep.write_text("user file")
    api.predict(fitted, good[2:3], out_dir=out)
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == [good[2].stem + ".png"]
    assert keep.read_text() == "user file"  # never delete what anomnet did not write
    assert len((out / "results.csv").read_text().splitlines()) == 2


def test_model_folder_checksums(fitted: Path, folder_dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    api.fit("patchcore", folder_dataset, other, settings={**SMALL, "coreset_ratio": 0.5}, progress=False)
    shutil.copy(other / TENSOR_FILE, fitted / TENSOR_FILE)
    with pytest.raises(ModelFormatError, match="checksum"):
        Detector.load(fitted)
    raw = bytearray((other / TENSOR_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (other / TENSOR_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="checksum"):
        Detector.load(other)


def test_model_written_whole_and_never_half(fitted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {n: (fitted / n).read_bytes() for n in (META_FILE, TENSOR_FILE)}
    det = Detector.load(fitted)
    det.calibration = det.calibration.rethreshold()

    from anomnet import durable

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # an interrupt once both files are written, before they take the folder's place

    monkeypatch.setattr(durable, "_swap", killed)
    with pytest.raises(KeyboardInterrupt):
        det.save(fitted)
    assert {n: (fitted / n).read_bytes() for n in (META_FILE, TENSOR_FILE)} == before
    assert [p.name for p in fitted.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_fit_refuses_existing_model_without_overwrite(fitted: Path, folder_dataset: Path, capsys) -> None:
    args = ["fit", "--data", str(folder_dataset), "--out", str(fitted), "--image-size", "64", "--quiet"]
    assert main(args) == EXIT_INPUT
    assert "already holds a model" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == EXIT_OK


def test_outputs_never_overwrite_inputs(fitted: Path, folder_dataset: Path, tmp_path: Path, capsys) -> None:
    image = folder_dataset / "test" / "good" / "g000.png"
    original = image.read_bytes()
    assert main(["predict", "--model-dir", str(fitted), str(image), "--csv", str(image), "--quiet"]) == EXIT_INPUT
    assert image.read_bytes() == original and "is also an input" in capsys.readouterr().err
    scanned = folder_dataset / "test"
    assert (
        main(["predict", "--model-dir", str(fitted), str(scanned), "--out", str(scanned / "o"), "--quiet"])
        == EXIT_INPUT
    )
    assert "inside the input folder" in capsys.readouterr().err and not (scanned / "o").exists()
    meta = (fitted / META_FILE).read_bytes()
    args = ["test", "--model-dir", str(fitted), "--data", str(folder_dataset), "--quiet"]
    assert main([*args, "--json", str(fitted / META_FILE)]) == EXIT_INPUT
    assert (fitted / META_FILE).read_bytes() == meta


def test_unwritable_out_fails_before_the_fit(folder_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    called = []
    monkeypatch.setattr("anomnet.api.create_detector", lambda *a, **k: called.append(1))
    code = main(["fit", "--data", str(folder_dataset), "--out", str(blocker / "model"), "--quiet"])
    assert code == EXIT_INPUT and not called and "not a folder" in capsys.readouterr().err


def test_read_only_model_folder_test_fails_early(fitted: Path, folder_dataset: Path, capsys, monkeypatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == fitted else real_access(p, m))
    called = []
    monkeypatch.setattr("anomnet.api.evaluate", lambda *a, **k: called.append(1))
    assert main(["test", "--model-dir", str(fitted), "--data", str(folder_dataset), "--quiet"]) == EXIT_INPUT
    assert not called and "not writable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", "abc"), ("threshold", None), ("threshold", float("nan")), ("image_method", 3)],
)
def test_hand_edited_calibration_is_refused(fitted: Path, field: str, value: object) -> None:
    meta = json.loads((fitted / META_FILE).read_text())
    meta["calibration"][field] = value
    (fitted / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=field):
        Detector.load(fitted)


def test_hand_edited_settings_are_refused(fitted: Path) -> None:
    meta = json.loads((fitted / META_FILE).read_text())
    meta["config"]["image_size"] = 512
    (fitted / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="settings were changed"):
        Detector.load(fitted)


def test_non_utf8_file_names(fitted: Path, folder_dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"part-\xff.png")
    shutil.copy(folder_dataset / "test" / "good" / "g000.png", folder / name)
    results = api.predict(fitted, [folder], out_dir=tmp_path / "pred")
    assert len(results) == 1 and results[0].error is None
    assert (tmp_path / "pred" / "results.csv").read_bytes()  # written (surrogates escaped, no crash)


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--threads", "-3"]])
def test_thread_counts_are_checked(argv: list[str], capsys) -> None:
    assert main([*argv, "models"]) == EXIT_INPUT
    assert "--threads" in capsys.readouterr().err


def test_image_size_upper_bound(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    code = main(["fit", "--data", str(folder_dataset), "--out", str(tmp_path / "m"), "--image-size", "100000"])
    assert code == EXIT_INPUT and "image_size=100000 is out of range" in capsys.readouterr().err


def test_closing_upper_bound(fitted: Path, capsys) -> None:
    assert main(["calibrate", "--model-dir", str(fitted), "--closing", "1000000000"]) == EXIT_INPUT
    assert "closing" in capsys.readouterr().err
    Detector.load(fitted)  # nothing was saved


def test_defective_images_without_masks_leave_pixel_metrics(
    folder_dataset: Path, fitted: Path, tmp_path: Path, capsys
) -> None:
    for m in sorted((folder_dataset / "masks").iterdir())[:2]:
        m.unlink()
    out = tmp_path / "metrics.json"
    res = api.test(fitted, folder_dataset, json_out=out, progress=False)
    payload = json.loads(out.read_text())
    assert payload["pixel_metrics_images"] == 8 - 2 and len(payload["pixel_metrics_skipped"]) == 2
    assert res.pixel_skipped == payload["pixel_metrics_skipped"]
    assert "have no mask" in capsys.readouterr().err


def test_zero_validation_fraction_is_refused(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    # hold-out calibration with nothing held out is refused (leave-one-out needs no hold-out)
    fit = ["fit", "--data", str(folder_dataset), "--out", str(tmp_path / "m"), "--val-fraction", "0", "--quiet"]
    assert main([*fit, "--calibration", "holdout"]) == EXIT_INPUT
    assert "no good validation images" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        api.fit("patchcore", folder_dataset, val_fraction=0.0, settings=SMALL, progress=False, calibration="holdout")


def test_model_and_output_files_share_permissions(fitted: Path, folder_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    api.predict(fitted, [folder_dataset / "test" / "good" / "g000.png"], out_dir=out)
    modes = {oct((fitted / n).stat().st_mode & 0o777) for n in (META_FILE, TENSOR_FILE)}
    modes.add(oct((out / "results.csv").stat().st_mode & 0o777))
    assert len(modes) == 1 and modes != {oct(0o600)}


@pytest.mark.parametrize("interrupted", ["replace", "_exchange"])
def test_interrupted_replace_keeps_the_users_files(
    fitted: Path, monkeypatch: pytest.MonkeyPatch, interrupted: str
) -> None:
    (fitted / "metrics.json").write_text("{}")  # a file of the user's next to the model
    (fitted / "notes.txt").write_text("mine")
    before = {n: (fitted / n).read_bytes() for n in (META_FILE, TENSOR_FILE)}
    det = Detector.load(fitted)
    from anomnet import durable

    owner = durable.os if interrupted == "replace" else durable
    real, calls = getattr(owner, interrupted), []

    def step(*args: object) -> object:
        calls.append(1)
        if len(calls) == (2 if interrupted == "replace" else 1):  # after one of the user's files moved; the swap
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(owner, interrupted, step)
    with pytest.raises(KeyboardInterrupt):
        det.save(fitted)
    monkeypatch.setattr(owner, interrupted, real)
    assert (fitted / "notes.txt").read_text() == "mine"
    assert (fitted / "metrics.json").read_text() == "{}"
    assert {n: (fitted / n).read_bytes() for n in (META_FILE, TENSOR_FILE)} == before
    assert [p.name for p in fitted.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", float("inf")),
        ("threshold", float("-inf")),
        ("max_false_alarm", 5),
        ("pixel_count", -1),
        ("pixel_tail", "abc"),
        ("pixel_tail", [["a", 1.0]]),
        ("labelled", "abc"),
        ("labelled", {"x": 1}),
        ("postprocess", [1]),
    ],
)
def test_hand_edited_calibration_values_are_refused(fitted: Path, field: str, value: object) -> None:
    meta = json.loads((fitted / META_FILE).read_text())
    meta["calibration"][field] = value
    (fitted / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=field):
        Detector.load(fitted)


@pytest.mark.parametrize(("field", "value"), [("calibration", []), ("calibration", None), ("detector", [1])])
def test_hand_edited_model_fields_are_refused(fitted: Path, field: str, value: object) -> None:
    meta = json.loads((fitted / META_FILE).read_text())
    meta[field] = value
    (fitted / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=field):
        Detector.load(fitted)


def test_test_outputs_never_land_in_the_data(fitted: Path, folder_dataset: Path, capsys) -> None:
    hm = folder_dataset / "test" / "hm"
    args = ["test", "--model-dir", str(fitted), "--data", str(folder_dataset), "--quiet"]
    assert main([*args, "--heatmaps", str(hm)]) == EXIT_INPUT
    assert "inside the input folder" in capsys.readouterr().err and not hm.exists()
    image = folder_dataset / "test" / "good" / "g000.png"
    original = image.read_bytes()
    assert main([*args, "--json", str(image)]) == EXIT_INPUT
    assert image.read_bytes() == original


def test_fit_out_never_holds_the_data(folder_dataset: Path, capsys) -> None:
    for out in (folder_dataset, folder_dataset.parent):
        args = ["fit", "--data", str(folder_dataset), "--out", str(out), "--image-size", "64", "--quiet", "--overwrite"]
        assert main(args) == EXIT_INPUT
        assert "dataset" in capsys.readouterr().err
    assert (folder_dataset / "train").is_dir()


@pytest.mark.parametrize("size", ["-5", "100000"])
def test_eval_size_bounds(fitted: Path, folder_dataset: Path, size: str, capsys) -> None:
    code = main(["test", "--model-dir", str(fitted), "--data", str(folder_dataset), "--eval-size", size, "--quiet"])
    assert code == EXIT_INPUT and f"eval_size={size} is out of range" in capsys.readouterr().err


def test_max_train_bound(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    code = main(["fit", "--data", str(folder_dataset), "--out", str(tmp_path / "m"), "--max-train", "-1", "--quiet"])
    assert code == EXIT_INPUT and "max_train must be at least 1" in capsys.readouterr().err


def test_api_predict_out_is_checked_first(fitted: Path, folder_dataset: Path) -> None:
    scanned = folder_dataset / "test"
    with pytest.raises(ConfigError, match="inside the input folder"):
        api.predict(fitted, [scanned], out_dir=scanned / "o")
    assert not (scanned / "o").exists()


def test_reused_out_folder_drops_emptied_subfolders(fitted: Path, folder_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    api.predict(fitted, [folder_dataset / "test"], out_dir=out)  # names keep the subfolders good/ and blob/
    assert (out / "heatmaps" / "blob").is_dir()
    (out / "masks" / "good" / "note.txt").write_text("user file")
    api.predict(fitted, [folder_dataset / "test" / "good" / "g000.png"], out_dir=out)
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["g000.png"]
    assert (out / "masks" / "good" / "note.txt").read_text() == "user file"


def test_heatmap_names_of_nested_images_are_unique(fitted: Path, folder_dataset: Path, tmp_path: Path) -> None:
    from anomnet.data import Sample

    image = folder_dataset / "test" / "good" / "g000.png"
    other = tmp_path / "nested" / "g000.png"
    other.parent.mkdir()
    shutil.copy(folder_dataset / "test" / "good" / "g001.png", other)
    written = api.write_heatmaps(Detector.load(fitted), [Sample(image, 0), Sample(other, 0)], tmp_path / "hm")
    assert len(set(written)) == 2 and all(p.is_file() for p in written)


def test_calibrate_with_zero_validation_fraction_is_refused(fitted: Path, folder_dataset: Path, capsys) -> None:
    before = (fitted / META_FILE).read_bytes()
    args = ["calibrate", "--model-dir", str(fitted), "--data", str(folder_dataset), "--val-fraction", "0", "--quiet"]
    assert main([*args, "--calibration", "holdout"]) == EXIT_INPUT
    assert "no good calibration images" in capsys.readouterr().err
    assert (fitted / META_FILE).read_bytes() == before
