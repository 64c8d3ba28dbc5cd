"""Folders written whole without losing the user's files: model folders, exported folders, anomnet.durable.

A kill is simulated in a forked child that exits (``os._exit``, no clean-up runs) at the n-th
rename or removal of :func:`anomnet.durable.write_folder`; the parent then checks that the
target holds the old files or the new ones and that every file of the user's is there, at
once or after the next write (which puts back what a kill left in the staging folder).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import make_folder_dataset
from tests.test_export import needs_export

from anomnet import api, durable
from anomnet.cli import EXIT_INPUT, main
from anomnet.detectors.base import Detector
from anomnet.errors import ConfigError, ModelFormatError
from anomnet.exported import MANIFEST, is_exported, load_exported, read_manifest
from anomnet.model_io import META_FILE, TENSOR_FILE, OldModelFormatWarning


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder``: files with their bytes, folders as None (the hidden swap mark left out)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
        if p.name != durable.MARK
    }


def _user_files(folder: Path) -> None:
    (folder / "NOTES.txt").write_text("my notes")
    (folder / "preds").mkdir()
    (folder / "preds" / "results.csv").write_text("path,score\n")


USER = {"NOTES.txt": b"my notes", "preds": None, "preds/results.csv": b"path,score\n"}


# -- the writer itself ---------------------------------------------------------------------------

OWNED = ("a.bin", "b.json")


def _owned(folder: Path) -> tuple[str, ...]:
    return OWNED if (folder / "b.json").is_file() else ()


def _fill(version: str) -> Callable[[Path], None]:
    def fill(staging: Path) -> None:
        (staging / "a.bin").write_bytes(version.encode() * 1000)
        (staging / "b.json").write_text(json.dumps({"version": version}))

    return fill


def _write(target: Path, version: str) -> Path:
    return durable.write_folder(target, _fill(version), _owned, "test folder")


def _model_of(folder: Path) -> dict[str, bytes | None]:
    return {k: v for k, v in _tree(folder).items() if k in OWNED}


def test_write_folder_replaces_its_files_and_keeps_the_users(tmp_path: Path) -> None:
    target = _write(tmp_path / "m", "old")
    _user_files(target)
    _write(target, "new")
    assert _tree(target) == {**USER, **_model_of(_write(tmp_path / "fresh", "new"))}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "m"]  # no staging folder left
    assert oct(os.stat(target / "a.bin").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_folder_through_a_link_writes_the_folder_it_names(tmp_path: Path) -> None:
    real = _write(tmp_path / "real", "old")
    _user_files(real)
    (tmp_path / "link").symlink_to(real)
    _write(tmp_path / "link", "new")
    assert (tmp_path / "link").is_symlink() and _tree(real) == {**USER, **_model_of(_write(tmp_path / "n", "new"))}


def test_write_folder_never_replaces_a_file_it_does_not_own(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "a.bin").write_text("the user's own a.bin")  # no b.json: the folder is not the writer's
    (target / "other.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"a\.bin is not part of a test folder"):
        _write(target, "new")
    assert _tree(target) == {"a.bin": b"the user's own a.bin", "other.txt": b"x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _killed_at(step: int, target: Path, version: str) -> bool:
    """Run the write in a child that dies (no clean-up) at its ``step``-th rename or removal; False if it finished."""
    pid = os.fork()
    if pid == 0:  # the child
        calls = [0]

        def dying(real: Callable[..., object]) -> Callable[..., object]:
            def call(*args: object, **kwargs: object) -> object:
                calls[0] += 1
                if calls[0] == step:
                    os._exit(137)
                return real(*args, **kwargs)

            return call

        durable.os.replace = dying(os.replace)  # type: ignore[assignment]
        durable._exchange = dying(durable._exchange)  # type: ignore[assignment]
        durable.shutil.rmtree = dying(shutil.rmtree)  # type: ignore[assignment]
        try:
            _write(target, version)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 137), f"the write failed at step {step}"
    return code == 137


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="simulates a kill with fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_kill_at_any_step_leaves_old_or_new_and_every_user_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # the fallback where the system cannot swap two folders in one step
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    old = _model_of(_write(tmp_path / "ref-old", "old"))
    new = _model_of(_write(tmp_path / "ref-new", "new"))
    step, outcomes = 1, set()
    while True:
        target = tmp_path / f"m{step}"
        _write(target, "old")
        _user_files(target)
        killed = _killed_at(step, target, "new")
        if target.is_dir():  # right after the kill: old or new, never a mix
            assert _model_of(target) in (old, new), f"a kill at step {step} left a mix"
            outcomes.add("old" if _model_of(target) == old else "new")
        else:  # only between the two renames of the fallback: the next write puts the old folder back
            assert not exchange, f"a kill at step {step} left no folder"
        _write(target, "again")  # the next write finds what the kill left and puts the user's files back
        assert _tree(target) == {**USER, **_model_of(_write(tmp_path / f"ref{step}", "again"))}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], f"step {step}"
        if not killed:
            break
        step += 1
    assert step >= 4 and outcomes == {"old", "new"}


def test_fsync_helpers_accept_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    durable.fsync_file(tmp_path / "f")
    durable.fsync_folder(tmp_path)
    durable.fsync_folder(tmp_path / "missing")  # best effort: nothing to flush
    with pytest.raises(FileNotFoundError):
        durable.fsync_file(tmp_path / "missing")


# -- model folders -------------------------------------------------------------------------------

SMALL = {"image_size": 64}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("durable")
    data = make_folder_dataset(root / "data")
    api.fit("patchcore", data, out=root / "model", settings=SMALL, progress=False)
    return root / "model"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _damage(path: Path) -> None:
    """Change weights so that they still load: a different value in the last float of the file."""
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_model_hashes_cannot_be_switched_off(small_model: Path, tmp_path: Path) -> None:
    folder = _copy(small_model, tmp_path / "m")
    meta = json.loads((folder / META_FILE).read_text())
    for key in ("weights_sha256", "config_sha256"):
        (folder / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(ModelFormatError, match=f"{key} is missing"):
            Detector.load(folder)
    (folder / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if not k.endswith("_sha256")}))
    _damage(folder / TENSOR_FILE)
    with pytest.raises(ModelFormatError, match="weights_sha256 is missing"):
        Detector.load(folder)


def test_a_model_of_the_previous_format_loads_with_a_warning(small_model: Path, tmp_path: Path) -> None:
    folder = _copy(small_model, tmp_path / "m")
    meta = json.loads((folder / META_FILE).read_text())
    old = {k: v for k, v in meta.items() if not k.endswith("_sha256")} | {"format_version": 1}
    (folder / META_FILE).write_text(json.dumps(old))
    with pytest.warns(OldModelFormatWarning, match="format version 1.*cannot be checked"):
        Detector.load(folder)
    (folder / META_FILE).write_text(json.dumps({**old, "weights_sha256": meta["weights_sha256"]}))
    _damage(folder / TENSOR_FILE)
    with pytest.warns(OldModelFormatWarning), pytest.raises(ModelFormatError, match="checksum"):
        Detector.load(folder)  # a hash an old folder has is still checked


def test_fit_overwrite_never_replaces_a_file_of_someone_else(tmp_path: Path, capsys) -> None:
    data = make_folder_dataset(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / META_FILE).write_text('{"name": "my project settings"}')
    (out / "main.c").write_text("int main;")
    args = ["fit", "--data", str(data), "--out", str(out), "--image-size", "64", "--quiet", "--overwrite"]
    assert main(args) == EXIT_INPUT
    assert "anomnet.json is not part of a model folder" in capsys.readouterr().err
    assert _tree(out) == {META_FILE: b'{"name": "my project settings"}', "main.c": b"int main;"}


# -- exported folders ----------------------------------------------------------------------------


def test_a_foreign_manifest_is_not_an_export(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"name": "my-app", "version": "1.0"}')
    assert not is_exported(tmp_path)
    (tmp_path / MANIFEST).write_text("not json")
    assert not is_exported(tmp_path)


@needs_export
def test_export_overwrite_refuses_a_folder_with_a_foreign_manifest(small_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / MANIFEST).write_text('{"name": "my-app", "version": "1.0"}')
    (out / "src" / "main.c").write_text("int main;")
    (out / "README").write_text("read me")
    before = _tree(out)
    args = ["export", "--model-dir", str(small_model), "--format", "onnx", "--out", str(out), "--overwrite"]
    assert main(args) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "not an anomnet export manifest" in err and "already holds an exported model" not in err
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["project"]


@needs_export
def test_export_overwrite_replaces_only_the_exports_own_files(small_model: Path, tmp_path: Path) -> None:
    from anomnet.export import export_model

    out = export_model(small_model, "torchscript", tmp_path / "e")
    _user_files(out)
    export_model(small_model, "onnx", out, overwrite=True)
    assert _tree(out).keys() == {MANIFEST, "model.onnx", *USER}
    assert {k: v for k, v in _tree(out).items() if k in USER} == USER
    assert read_manifest(out)["graph_format"] == "onnx"
    load_exported(out)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def _with_external_data(real: Callable[..., None]) -> Callable[..., None]:
    """torch's ONNX writer, then the tensors moved into an external-data file beside the graph (as for > 2 GB)."""

    def write(graph: object, example: object, path: Path) -> None:
        import onnx

        real(graph, example, path)
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)

    return write


@needs_export
def test_every_file_an_export_reads_is_hashed(small_model: Path, tmp_path: Path, monkeypatch) -> None:
    from anomnet.export import export_model, writer

    monkeypatch.setattr(writer, "_write_onnx", _with_external_data(writer._write_onnx))
    out = export_model(small_model, "onnx", tmp_path / "e")
    files = read_manifest(out)["files"]
    assert sorted(files) == ["model.onnx", "model.onnx.data"]
    good = load_exported(out)
    images = np.full((1, 64, 64, 3), 128, np.uint8)
    score = good.run(images)[0]
    bad = _copy(out, tmp_path / "bad")
    _damage(bad / "model.onnx.data")
    with pytest.raises(ModelFormatError, match=r"model\.onnx\.data: does not match manifest\.json"):
        load_exported(bad)
    assert np.array_equal(load_exported(out).run(images)[0], score)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../x", ""])
def test_a_manifest_may_name_only_files_inside_its_folder(tmp_path: Path, name: str) -> None:
    manifest = {
        "format": "anomnet-export",
        "format_version": 1,
        "graph_format": "onnx",
        "files": {"model.onnx": "0" * 64, name: "0" * 64},
        "detector": "patchcore",
        "calibration": {},
        "batch_size": 1,
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="inside the folder"):
        read_manifest(tmp_path, check_files=False)
