"""The hot folder (anomnet watch): complete files only, exactly one row per file across kills, bad files, moves."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from tests.conftest import make_folder_dataset

from anomnet.cli import EXIT_OK, EXIT_SOME_FAILED, main
from anomnet.decisions.calibration import Calibration
from anomnet.errors import ConfigError
from anomnet.imageio import read_image
from anomnet.predict.scoring import load_scorer
from anomnet.watch import HotFolder, WatchError, WatchOptions
from anomnet.watch.inbox import SettleTracker, is_candidate, scan
from anomnet.watch.journal import STATE_FILE, WATCH_CSV_COLUMNS
from anomnet.watch.moves import finish_move, free_path, move_no_clobber

FAST = WatchOptions(settle=0.0, poll=0.02)


class FakeScorer:
    """Score = mean brightness, map = the red channel; counts every image it is given."""

    def __init__(self, batch_size: int = 2, fail_on_width: int | None = None) -> None:
        self.calibration = Calibration(validation_scores=[0.1, 0.2, 0.3], threshold=0.6, pixel_threshold=0.9)
        self.batch_size = batch_size
        self.fail_on_width = fail_on_width
        self.scored = 0

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if images.shape[2] == self.fail_on_width:
            raise RuntimeError("the model broke on this size")
        self.scored += len(images)
        return images.mean(axis=(1, 2, 3)).astype(np.float64), images[..., 0].astype(np.float32)


def png_bytes(seed: int, size: int = 24) -> bytes:
    """A noisy PNG (does not compress to nothing, so it can be written in several chunks)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def expected_score(data: bytes, tmp: Path) -> float:
    tmp.write_bytes(data)
    return float(read_image(tmp).mean())


def rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]  # a line still being appended is not read


def csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_journal(out: Path) -> list[dict]:
    """results.jsonl and results.csv agree row by row; the CSV has one header; no row id twice."""
    js, cs = rows(out), csv_rows(out)
    assert [r["id"] for r in js] == [r["id"] for r in cs]
    assert len({r["id"] for r in js}) == len(js)
    assert (out / "results.csv").read_text().count("path,score") == 1
    assert [r["path"] for r in js] == [r["path"] for r in cs]
    return js


def sources(out: Path) -> list[str]:
    return sorted(Path(r["source"]).name for r in rows(out))


def quiet(_: str) -> None:
    pass


# -- what the inbox offers ----------------------------------------------------------------------


def test_candidates_skip_temporary_names_non_images_and_hidden_folders(tmp_path: Path) -> None:
    for name in ("a.png", "b.JPG", "c.png.tmp", "d.part", ".e.png", "~f.png", "g.png~", "notes.txt", "h.tiff"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "i.png").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "j.png").write_bytes(b"x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "k.png").write_bytes(b"x")
    assert [p.name for p in scan(tmp_path, recursive=False)] == ["a.png", "b.JPG", "h.tiff"]
    deep = scan(tmp_path, recursive=True, skip=[tmp_path / "done"])
    assert [p.relative_to(tmp_path).as_posix() for p in deep] == ["a.png", "b.JPG", "h.tiff", "sub/i.png"]
    assert not is_candidate("x.PNG.partial") and is_candidate("x.bmp")


def test_a_file_is_ready_only_after_it_stayed_unchanged_for_the_settle_time(tmp_path: Path) -> None:
    now = [0.0]
    tracker = SettleTracker(1.0, clock=lambda: now[0])
    f = tmp_path / "a.png"
    f.write_bytes(b"1")
    assert tracker.update([f]) == []
    now[0] = 0.6
    with open(f, "ab") as h:
        h.write(b"2")  # grows: the wait starts over
    assert tracker.update([f]) == []
    now[0] = 1.5
    assert tracker.update([f]) == []  # 0.9 s unchanged
    now[0] = 1.7
    assert [p for p, _ in tracker.update([f])] == [f]
    assert SettleTracker(0.0).update([f])[0][0] == f  # settle 0: at first sight


# -- moving without replacing -------------------------------------------------------------------


def test_moves_never_replace_a_file_and_can_be_finished_after_a_kill(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "a.png").write_bytes(b"old")
    src = tmp_path / "a.png"
    src.write_bytes(b"new")
    dst = free_path(tmp_path / "done" / "a.png")
    assert dst.name == "a__2.png"
    with pytest.raises(FileExistsError):
        move_no_clobber(src, tmp_path / "done" / "a.png")
    assert (tmp_path / "done" / "a.png").read_bytes() == b"old"
    os.link(src, dst)  # killed between the link and the unlink
    assert finish_move(src, dst).value == "already moved"
    assert not src.exists() and dst.read_bytes() == b"new"
    assert finish_move(src, dst).value == "already moved"  # repeating is harmless


def test_a_move_across_file_systems_copies_never_replaces_and_keeps_the_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def link(a: str | Path, b: str | Path, **kw: object) -> None:
        if Path(a).parent == tmp_path:  # the inbox is on another file system: no link from there
            raise OSError(errno.EXDEV, "cross-device link")
        real_link(a, b, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    src = tmp_path / "a.png"
    src.write_bytes(b"new")
    os.utime(src, ns=(1_000_000_000, 2_000_000_000))
    os.chmod(src, 0o640)
    move_no_clobber(src, tmp_path / "done" / "a.png")
    dst = tmp_path / "done" / "a.png"
    assert not src.exists() and dst.read_bytes() == b"new" and dst.stat().st_mtime_ns == 2_000_000_000
    assert dst.stat().st_mode & 0o777 == 0o640 and os.listdir(dst.parent) == ["a.png"]  # no temporary left
    src.write_bytes(b"other")
    with pytest.raises(FileExistsError):
        move_no_clobber(src, dst)
    assert dst.read_bytes() == b"new" and os.listdir(dst.parent) == ["a.png"]


# -- one run ------------------------------------------------------------------------------------


def test_once_scores_each_file_moves_it_and_appends_rows(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    data = {f"img{i}.png": png_bytes(i) for i in range(5)}
    for name, b in data.items():
        (inbox / name).write_bytes(b)
    scorer = FakeScorer(batch_size=2)
    with HotFolder(scorer, inbox, out, FAST, log=quiet) as folder:
        summary = folder.run(once=True)
    assert summary.processed == 5 and summary.errors == 0 and scorer.scored == 5
    js = check_journal(out)
    assert sorted(Path(r["source"]).name for r in js) == sorted(data)
    for r in js:
        name = Path(r["source"]).name
        assert r["path"] == str(out / "processed" / name) and Path(r["path"]).read_bytes() == data[name]
        assert r["score"] == pytest.approx(expected_score(data[name], tmp_path / "x.png"))
        for f in r["outputs"].values():
            assert Path(f).is_file()
    assert list(inbox.iterdir()) == [] and not json.loads((out / STATE_FILE).read_text())["claims"]

    # the camera reuses a name: a second run appends (one header), and nothing already there is replaced
    (inbox / "img0.png").write_bytes(png_bytes(99))
    with HotFolder(FakeScorer(), inbox, out, FAST, log=quiet) as folder:
        assert folder.run(once=True).processed == 1
    js = check_journal(out)
    assert len(js) == 6
    last = js[-1]
    assert last["path"] == str(out / "processed" / "img0__2.png")
    assert (out / "processed" / "img0.png").read_bytes() == data["img0.png"]
    assert last["outputs"]["heatmap"] == str(out / "heatmaps" / "img0__2.png")
    assert list(csv_rows(out)[0]) == list(WATCH_CSV_COLUMNS)


def test_bad_files_get_error_rows_and_go_to_the_error_folder(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    good = png_bytes(1)
    (inbox / "good.png").write_bytes(good)
    (inbox / "truncated.png").write_bytes(good[: len(good) // 2])
    (inbox / "text.png").write_text("this is not an image\n")
    (inbox / "empty.jpg").write_bytes(b"")
    five = np.zeros((8, 8, 5), np.uint8)  # five samples per pixel
    tifffile.imwrite(inbox / "channels.tif", five, photometric="minisblack", planarconfig="contig")
    Image.fromarray(np.zeros((24, 7, 3), np.uint8)).save(inbox / "narrow.png")  # the model itself fails on it
    scorer = FakeScorer(batch_size=8, fail_on_width=7)
    lines: list[str] = []
    with HotFolder(scorer, inbox, out, FAST, log=lines.append) as folder:
        summary = folder.run(once=True)
    js = {Path(r["source"]).name: r for r in check_journal(out)}
    assert sorted(js) == ["channels.tif", "empty.jpg", "good.png", "narrow.png", "text.png", "truncated.png"]
    assert summary.processed == 6 and summary.errors == 5
    assert js["good.png"]["error"] is None and js["good.png"]["path"] == str(out / "processed" / "good.png")
    for name, r in js.items():
        if name != "good.png":
            assert r["error"] and r["score"] is None and r["outputs"] == {}
            assert r["path"] == str(out / "errors" / name) and Path(r["path"]).is_file()
    assert "RuntimeError" in js["narrow.png"]["error"]
    assert any(line.startswith("ERROR") and "truncated.png" in line for line in lines)
    assert list(inbox.iterdir()) == []


def test_keep_leaves_files_in_place_and_scores_each_version_once(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"k{i}.png").write_bytes(png_bytes(i))
    opts = WatchOptions(settle=0.0, poll=0.02, keep=True)
    with HotFolder(FakeScorer(), inbox, out, opts, log=quiet) as folder:
        assert folder.run(once=True).processed == 3
    with HotFolder(FakeScorer(), inbox, out, opts, log=quiet) as folder:  # a restart: nothing new
        assert folder.run(once=True).processed == 0
    (inbox / "k1.png").write_bytes(png_bytes(50))  # replaced by new content under the same name
    with HotFolder(FakeScorer(), inbox, out, opts, log=quiet) as folder:
        assert folder.run(once=True).processed == 1
    js = check_journal(out)
    assert [Path(r["path"]).name for r in js][-1] == "k1.png" and len(js) == 4
    assert sorted(p.name for p in inbox.iterdir()) == ["k0.png", "k1.png", "k2.png"]


def test_refusals_second_watcher_foreign_csv_done_folder_in_inbox(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    with (
        HotFolder(FakeScorer(), inbox, out, FAST, log=quiet),
        pytest.raises(WatchError, match="another anomnet watch"),
    ):
        HotFolder(FakeScorer(), inbox, out, FAST, log=quiet)
    other = tmp_path / "predict-out"
    other.mkdir()
    (other / "results.csv").write_text("path,score,p_value,defective,defect_pixels,regions,error\n")
    with pytest.raises(WatchError, match="not written by anomnet watch"):
        HotFolder(FakeScorer(), inbox, other, FAST, log=quiet)
    with pytest.raises(ConfigError, match="inside the input folder"):
        HotFolder(FakeScorer(), inbox, inbox / "out", FAST, log=quiet)
    recursive = WatchOptions(settle=0.0, recursive=True, done_dir=inbox / "done")
    with pytest.raises(ConfigError, match="lies in the watched inbox"):
        HotFolder(FakeScorer(), inbox, out, recursive, log=quiet)
    with pytest.raises(ConfigError, match="settle"):
        HotFolder(FakeScorer(), inbox, out, WatchOptions(settle=-1), log=quiet)


# -- files still being written --------------------------------------------------------------------


def write_slowly(path: Path, data: bytes, chunks: int, pause: float) -> None:
    step = -(-len(data) // chunks)
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(pause)


def write_renamed(path: Path, data: bytes, chunks: int, pause: float) -> None:
    tmp = path.with_name(path.name + ".part")
    write_slowly(tmp, data, chunks, pause)
    os.replace(tmp, path)


def run_until(folder: HotFolder, done: Callable[[], bool], timeout: float = 60.0) -> None:
    """Run the watcher in a thread until ``done()`` holds, then stop it (a SIGINT's path: the stop event)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            folder.run(stop=stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert done(), "the watcher did not finish in time"


def test_slow_writers_are_never_scored_before_their_file_is_complete(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    data = {f"slow{i}.png": png_bytes(10 + i, size=40) for i in range(3)}
    data.update({f"ren{i}.png": png_bytes(20 + i, size=40) for i in range(2)})
    scorer = FakeScorer(batch_size=4)
    folder = HotFolder(scorer, inbox, out, WatchOptions(settle=0.4, poll=0.02), log=quiet)
    writers = [
        threading.Thread(target=write_slowly, args=(inbox / n, b, 6, 0.1)) for n, b in data.items() if "slow" in n
    ] + [threading.Thread(target=write_renamed, args=(inbox / n, b, 6, 0.1)) for n, b in data.items() if "ren" in n]
    for w in writers:
        w.start()
    try:
        run_until(folder, lambda: len(rows(out)) >= len(data))
    finally:
        for w in writers:
            w.join()
        folder.close()
    js = check_journal(out)
    assert sorted(Path(r["source"]).name for r in js) == sorted(data)
    for r in js:
        name = Path(r["source"]).name
        assert r["error"] is None, r  # a half-written PNG would be a read error
        assert r["score"] == pytest.approx(expected_score(data[name], tmp_path / "x.png"))
    assert scorer.scored == len(data)  # nothing scored twice


def test_several_concurrent_writers_give_exactly_one_row_per_file(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    plan = {w: {f"w{w}_{i}.png": png_bytes(100 * w + i, size=32) for i in range(5)} for w in range(4)}

    def writer(w: int) -> None:
        for i, (name, b) in enumerate(plan[w].items()):
            if i % 2:
                write_renamed(inbox / name, b, 3, 0.02)
            else:
                write_slowly(inbox / name, b, 3, 0.05)

    total = sum(len(v) for v in plan.values())
    scorer = FakeScorer(batch_size=3)
    folder = HotFolder(scorer, inbox, out, WatchOptions(settle=0.3, poll=0.02), log=quiet)
    threads = [threading.Thread(target=writer, args=(w,)) for w in plan]
    for t in threads:
        t.start()
    try:
        run_until(folder, lambda: len(rows(out)) >= total and not any(t.is_alive() for t in threads))
        time.sleep(0.5)  # nothing more may come
    finally:
        for t in threads:
            t.join()
        folder.close()
    js = check_journal(out)
    assert len(js) == total and all(r["error"] is None for r in js)
    assert sorted(Path(r["source"]).name for r in js) == sorted(n for v in plan.values() for n in v)
    assert scorer.scored == total
    assert list(inbox.iterdir()) == []


# -- kills at every step ----------------------------------------------------------------------------

STEPS = ["claimed", "scored", "outputs written", "jsonl appended", "csv appended", "moved"]


class Killed(BaseException):
    """Stands for a kill: nothing after the checkpoint runs, nothing is cleaned up."""


class CrashingFolder(HotFolder):
    def __init__(self, *args, crash_at: tuple[str, int] | None = None, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at
        self.hits: dict[str, int] = {}

    def _checkpoint(self, step: str) -> None:
        self.hits[step] = self.hits.get(step, 0) + 1
        if self.crash_at == (step, self.hits[step]):
            raise Killed(step)


def run_crashing(scorer: FakeScorer, inbox: Path, out: Path, crash_at: tuple[str, int] | None) -> bool:
    """One watcher run that may be 'killed' at ``crash_at``; True when it was."""
    folder = CrashingFolder(scorer, inbox, out, FAST, log=quiet, crash_at=crash_at)
    try:
        folder.run(once=True)
        return False
    except Killed:
        return True
    finally:
        folder.close()  # the process died: its lock goes with it


@pytest.mark.parametrize("first", [(s, n) for s in STEPS for n in (1, 2)])
def test_a_kill_at_any_step_and_again_during_recovery_ends_in_one_row_per_file(
    tmp_path: Path, first: tuple[str, int]
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    data = {f"p{i}.png": png_bytes(i) for i in range(5)}
    data["bad.png"] = b"not an image"
    for name, b in data.items():
        (inbox / name).write_bytes(b)
    scorer = FakeScorer(batch_size=2)
    assert run_crashing(scorer, inbox, out, first)
    for second in [(s, 1) for s in STEPS if s != "claimed"]:  # recovery itself killed, each step in turn
        run_crashing(scorer, inbox, out, second)
    assert not run_crashing(scorer, inbox, out, None)
    js = check_journal(out)
    assert sorted(Path(r["source"]).name for r in js) == sorted(data)
    for r in js:
        name = Path(r["source"]).name
        assert Path(r["path"]).read_bytes() == data[name]
        assert Path(r["path"]).parent.name == ("errors" if name == "bad.png" else "processed")
    assert list(inbox.iterdir()) == []
    assert sorted(p.name for p in (out / "processed").iterdir()) == sorted(n for n in data if n != "bad.png")
    assert len(list((out / "heatmaps").iterdir())) == 5  # one heat map per good file, no __2 left over


def test_torn_last_rows_are_cut_and_rewritten(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(4):
        (inbox / f"t{i}.png").write_bytes(png_bytes(i))
    scorer = FakeScorer(batch_size=2)
    assert run_crashing(scorer, inbox, out, ("outputs written", 2))  # second batch: no row yet
    with open(out / "results.jsonl", "a") as f:
        f.write('{"path": "half a row')  # killed in the middle of the append
    assert not run_crashing(scorer, inbox, out, None)
    assert sources(out) == ["t0.png", "t1.png", "t2.png", "t3.png"]

    for i in range(4, 6):
        (inbox / f"t{i}.png").write_bytes(png_bytes(i))
    assert run_crashing(scorer, inbox, out, ("jsonl appended", 1))  # the JSON rows are in, the CSV rows not
    with open(out / "results.csv", "a") as f:
        f.write('/half/a/row.png,0.5,"0.2')
    assert not run_crashing(scorer, inbox, out, None)
    check_journal(out)
    assert sources(out) == [f"t{i}.png" for i in range(6)]
    assert scorer.scored == 6 + 2  # the batch without a row was scored again, the one with rows was not


def test_a_file_rewritten_after_its_claim_waits_and_is_scored_in_its_final_form(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    (inbox / "c.png").write_bytes(png_bytes(1))
    assert run_crashing(FakeScorer(), inbox, out, ("claimed", 1))
    final = png_bytes(2, size=30)
    (inbox / "c.png").write_bytes(final[:100])  # the station rewrites it and is not done yet
    with HotFolder(FakeScorer(), inbox, out, WatchOptions(settle=0.2, poll=0.02), log=quiet) as folder:
        folder.recover()
        assert rows(out) == [] and (inbox / "c.png").exists()  # no error row for the half-written file
        (inbox / "c.png").write_bytes(final)
        assert folder.run(once=True).processed == 1
    (r,) = check_journal(out)
    assert r["error"] is None and r["score"] == pytest.approx(expected_score(final, tmp_path / "x.png"))


def test_a_new_file_under_a_moved_files_name_is_its_own_row(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    (inbox / "n.png").write_bytes(png_bytes(1))
    assert run_crashing(FakeScorer(), inbox, out, ("moved", 1))  # moved, the claim not yet dropped
    (inbox / "n.png").write_bytes(png_bytes(2))  # the station reuses the name at once
    assert not run_crashing(FakeScorer(), inbox, out, None)
    js = check_journal(out)
    assert [Path(r["path"]).name for r in js] == ["n.png", "n__2.png"]
    assert [Path(r["path"]).read_bytes() for r in js] == [png_bytes(1), png_bytes(2)]


def test_a_failed_move_is_retried_at_the_next_start_without_scoring_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomnet.watch import folder as folder_mod

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    (inbox / "m.png").write_bytes(png_bytes(1))

    def refuse(src: Path, dst: Path) -> None:
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(folder_mod, "finish_move", refuse)
    scorer = FakeScorer()
    lines: list[str] = []
    with HotFolder(scorer, inbox, out, FAST, log=lines.append) as folder:
        assert folder.run(once=True).processed == 1  # --once does not wait for the move
    assert (inbox / "m.png").exists() and any("MOVE FAILED" in line for line in lines)
    monkeypatch.undo()
    with HotFolder(scorer, inbox, out, FAST, log=quiet) as folder:
        folder.run(once=True)
    assert not (inbox / "m.png").exists() and (out / "processed" / "m.png").exists()
    assert len(check_journal(out)) == 1 and scorer.scored == 1


def test_rows_that_cannot_be_appended_stop_the_watcher_with_a_clear_error_and_resume(tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"a{i}.png").write_bytes(png_bytes(i))
    (out / "results.jsonl").mkdir(parents=True)  # stands for a full or broken disk: the append fails
    with HotFolder(FakeScorer(), inbox, out, FAST, log=quiet) as folder, pytest.raises(WatchError, match="appended"):
        folder.run(once=True)
    (out / "results.jsonl").rmdir()
    with HotFolder(FakeScorer(), inbox, out, FAST, log=quiet) as folder:
        folder.run(once=True)
    assert sources(out) == ["a0.png", "a1.png", "a2.png"] and list(inbox.iterdir()) == []
    check_journal(out)


# -- the command, a real model, real kills -----------------------------------------------------------

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("watchdata") / "data")


@pytest.fixture(scope="module")
def model_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("watchmodel") / "model"
    assert main(["fit", "--data", str(dataset), "--out", str(out), *SMALL]) == EXIT_OK
    return out


def test_watch_command_once_matches_predict(model_dir: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    images = sorted((dataset / "test").rglob("*.png"))
    for f in images:
        (inbox / f.name).write_bytes(f.read_bytes())
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    argv = ["watch", "--model-dir", str(model_dir), str(inbox), "--out", str(out), "--once", "--settle", "0"]
    assert main([*argv, "--raw-maps"]) == EXIT_SOME_FAILED
    log = capsys.readouterr().out
    assert "DEFECTIVE" in log and "ERROR" in log and "broken.png" in log
    assert main(["predict", "--model-dir", str(model_dir), *map(str, images), "--out", str(tmp_path / "pred")]) == 0
    predicted = {Path(r["path"]).name: r for r in rows(tmp_path / "pred")}
    watched = {Path(r["source"]).name: r for r in check_journal(out)}
    assert sorted(watched) == sorted([*predicted, "broken.png"])
    for name, r in predicted.items():
        assert watched[name]["score"] == pytest.approx(r["score"], rel=1e-5)
        assert watched[name]["defective"] == r["defective"]
        assert Path(watched[name]["outputs"]["map"]).is_file()
    caught = sum(r["defective"] for r in predicted.values())
    assert caught >= 3  # the blob images are caught
    assert f"stopped: 9 files processed, {caught} defective, 1 failed" in log
    assert main([*argv]) == EXIT_OK  # nothing left: a second --once does nothing
    assert len(rows(out)) == 9


def _start(model_dir: Path, inbox: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "anomnet.cli", "--threads", "1", "watch", "--model-dir", str(model_dir)]
    cmd += [str(inbox), "--out", str(out), "--settle", "0.2", "--poll", "0.05"]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115


def _wait(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, "the watcher exited early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_killed_watcher_process_restarts_without_double_or_missed_rows(
    model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    inbox, out, log = tmp_path / "inbox", tmp_path / "out", tmp_path / "watch.log"
    inbox.mkdir()
    images = sorted((dataset / "test").rglob("*.png")) + sorted((dataset / "train").glob("*.png"))
    names = []
    rng = np.random.default_rng(0)
    for round_ in range(2):  # two kills with SIGKILL at a random moment while files are being scored
        proc = _start(model_dir, inbox, out, log)
        for f in images[round_ * 10 : round_ * 10 + 10]:
            write_renamed(inbox / f"r{round_}_{f.name}", f.read_bytes(), 2, 0.0)
            names.append(f"r{round_}_{f.name}")
        before = len(rows(out))
        _wait(lambda: len(rows(out)) > before, proc)  # noqa: B023 - evaluated inside the loop
        time.sleep(float(rng.uniform(0, 0.15)))
        proc.kill()
        proc.wait(30)
    (inbox / "broken.png").write_bytes(b"garbage")
    names.append("broken.png")
    proc = _start(model_dir, inbox, out, log)
    try:
        _wait(lambda: len(rows(out)) >= len(names), proc)
        proc.send_signal(signal.SIGTERM)  # a clean stop
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "SIGTERM: stopping" in text and "stopped:" in text
    js = check_journal(out)
    assert sorted(Path(r["source"]).name for r in js) == sorted(names), text[-3000:]
    assert list(inbox.iterdir()) == []
    assert len(list((out / "processed").iterdir())) == len(names) - 1
    with HotFolder(load_scorer(model_dir), inbox, out, FAST, log=quiet) as folder:  # nothing left over
        assert folder.run(once=True).processed == 0
    assert json.loads((out / STATE_FILE).read_text())["claims"] == []


# -- hostile inboxes -------------------------------------------------------------------------------


def test_a_deleted_inbox_stops_the_watcher_with_a_clear_line(tmp_path: Path) -> None:
    import shutil

    from anomnet.watch.folder import InboxGone

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(png_bytes(1))
    lines: list[str] = []
    caught: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        with HotFolder(FakeScorer(), inbox, out, FAST, log=lines.append) as folder:
            try:
                folder.run(stop=stop)
            except InboxGone as exc:
                caught.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        # the file leaves the inbox after its row is written: delete the inbox once it has moved
        while not (rows(out) and (out / "processed" / "a.png").is_file()) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(inbox)
        thread.join(10)
        assert not thread.is_alive(), "the watcher kept polling a deleted inbox"
    finally:
        stop.set()
        thread.join(10)
    (exc,) = caught
    assert exc.summary.processed == 1 and "disappeared" in str(exc) and isinstance(exc, WatchError)
    assert any(line.startswith("STOPPED    the inbox") and "is gone" in line for line in lines), lines
    assert len(rows(out)) == 1 and (out / "processed" / "a.png").is_file()


def test_a_link_in_the_inbox_is_skipped_and_said_once(tmp_path: Path) -> None:
    inbox, out, outside = tmp_path / "inbox", tmp_path / "out", tmp_path / "secret"
    inbox.mkdir()
    outside.mkdir()
    (outside / "private.png").write_bytes(png_bytes(2))
    (inbox / "link.png").symlink_to(outside / "private.png")
    (inbox / "real.png").write_bytes(png_bytes(3))
    lines: list[str] = []
    with HotFolder(FakeScorer(), inbox, out, FAST, log=lines.append) as folder:
        folder.run(once=True)
        folder.poll()
        folder.poll()
    assert sources(out) == ["real.png"]
    said = [line for line in lines if "link.png" in line]
    assert len(said) == 1 and said[0].startswith("SKIPPED    link.png: a symbolic link (to "), said
    assert "never followed" in said[0]
    assert (inbox / "link.png").is_symlink() and (outside / "private.png").is_file()  # neither moved nor read


def test_a_name_that_is_not_utf8_with_a_strict_utf8_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    name = os.fsdecode(b"part\xff17.png")  # a Latin-1 name from a camera station's share
    (inbox / name).write_bytes(png_bytes(4))
    console = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # PYTHONIOENCODING=utf-8
    monkeypatch.setattr(sys, "stdout", console)
    with HotFolder(FakeScorer(), inbox, out, FAST) as folder:  # the default log prints to stdout
        assert folder.run(once=True).processed == 1
    console.flush()
    printed = console.buffer.getvalue().decode("utf-8")  # type: ignore[attr-defined]
    assert "part\\xff17.png" in printed and "stopped: 1 files processed" in printed
    assert list(inbox.iterdir()) == [] and len(list((out / "processed").iterdir())) == 1
    assert json.loads((out / "results.jsonl").read_text())["source"] == str(inbox / name)


def test_watch_command_with_a_strict_utf8_stdout_and_a_latin1_name(model_dir: Path, tmp_path: Path) -> None:
    """The issue's case as the command: PYTHONIOENCODING=utf-8, a name that is not UTF-8; exit 0, the file moved."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    (inbox / os.fsdecode(b"caf\xe9.png")).write_bytes(png_bytes(8, size=64))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "anomnet.cli", "--threads", "1", "watch", "--model-dir", str(model_dir)]
    proc = subprocess.run(
        [*cmd, str(inbox), "--out", str(out), "--settle", "0", "--once"],
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == EXIT_OK, proc.stderr.decode(errors="replace")
    assert b"caf\\xe9.png" in proc.stdout and b"Traceback" not in proc.stderr
    assert list(inbox.iterdir()) == [] and [p.name for p in (out / "processed").iterdir()] == [
        os.fsdecode(b"caf\xe9.png")
    ]


class KillingScorer(FakeScorer):
    """Dies (as a decoder crash or the out-of-memory killer would kill the process) on images 30 px wide."""

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if images.shape[2] == 30:
            raise Killed("the process died while scoring")
        return super().score_arrays(images)


def test_a_file_that_kills_the_watcher_becomes_an_error_row_not_a_crash_loop(tmp_path: Path) -> None:
    from anomnet.watch.folder import MAX_SCORING_ATTEMPTS

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(png_bytes(5))
    (inbox / "b_bomb.png").write_bytes(png_bytes(6, size=30))
    (inbox / "c.png").write_bytes(png_bytes(7))
    kills = 0
    for _ in range(MAX_SCORING_ATTEMPTS + 2):  # each start is a restart by the service manager
        folder = HotFolder(KillingScorer(batch_size=2), inbox, out, FAST, log=quiet)
        try:
            folder.run(once=True)
            break
        except Killed:
            kills += 1
        finally:
            folder.close()
    assert kills == MAX_SCORING_ATTEMPTS, "a file that kills the watcher each time must stop being retried"
    js = {Path(r["source"]).name: r for r in check_journal(out)}
    assert sorted(js) == ["a.png", "b_bomb.png", "c.png"]
    assert js["a.png"]["error"] is None and js["c.png"]["error"] is None
    assert js["b_bomb.png"]["score"] is None and "died" in js["b_bomb.png"]["error"]
    assert js["b_bomb.png"]["path"] == str(out / "errors" / "b_bomb.png")
    assert json.loads((out / STATE_FILE).read_text())["claims"] == []


def test_importing_the_hot_folder_needs_no_torch() -> None:
    code = "import sys, anomnet.watch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
