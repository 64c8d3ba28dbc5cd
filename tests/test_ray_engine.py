"""The batch engine: inputs (folders, globs, manifests, products), the worker's scorer, the journal, and
`predict --engine ray` on a local Ray with 2 CPUs: one row per input (also after a killed worker), resume,
bad files as error rows with exit code 3.

The parts without Ray need pyarrow (installed with Ray by the anomnet[ray] extra); the Ray tests share the
session's local Ray (conftest.local_ray).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow", reason="the batch engine needs the anomnet[ray] extra (pyarrow, ray[data])")
pq = pytest.importorskip("pyarrow.parquet")

from anomnet.decisions.calibration import Calibration  # noqa: E402
from anomnet.engine import rows as rows_mod  # noqa: E402
from anomnet.engine import worker as worker_mod  # noqa: E402
from anomnet.engine.models import check_products, resolve_models  # noqa: E402
from anomnet.engine.rows import Journal, done_keys, finalise, inputs_table, rows_table  # noqa: E402
from anomnet.engine.worker import BatchScorer  # noqa: E402
from anomnet.errors import ConfigError, ModelFormatError  # noqa: E402
from anomnet.predict.inputs import InputImage, collect_inputs  # noqa: E402
from anomnet.predict.outputs import clear_previous_run  # noqa: E402
from anomnet.predict.scoring import ImagePrediction  # noqa: E402


class FakeScorer:
    """Score = mean brightness + offset; map = the red channel. No torch, pickles by value to Ray workers."""

    batch_size = 4

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.calibration = Calibration(validation_scores=[0.1, 0.2, 0.3], threshold=0.5, pixel_threshold=0.5)

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images.mean(axis=(1, 2, 3)).astype(np.float64) + self.offset, images[..., 0].astype(np.float32)


def _images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), (7 * i) % 256, np.uint8)).save(path)
        paths.append(path)
    return paths


# -- inputs -----------------------------------------------------------------------------------------


def test_folders_globs_and_files_give_absolute_paths_and_unique_names(tmp_path: Path, monkeypatch) -> None:
    _images(tmp_path / "a" / "x", 2)
    _images(tmp_path / "b", 2)
    monkeypatch.chdir(tmp_path)
    refs = collect_inputs(["a", "b/**/*.png", "b/000.png", "missing.png"], batch=True)
    assert [r.path for r in refs] == [
        str(tmp_path / "a/x/000.png"),
        str(tmp_path / "a/x/001.png"),
        str(tmp_path / "b/000.png"),  # b/000.png again below: one input
        str(tmp_path / "b/001.png"),
        str(tmp_path / "missing.png"),  # kept: it becomes an error row
    ]
    assert [r.name for r in refs] == ["x/000", "x/001", "000", "001", "missing"]
    with pytest.raises(ConfigError, match="no image file matches"):
        collect_inputs([str(tmp_path / "nothing" / "*.png")], batch=True)


def test_manifests_csv_and_parquet_with_products(tmp_path: Path) -> None:
    _images(tmp_path / "data" / "cam1", 2)
    _images(tmp_path / "data" / "cam2", 1)
    (tmp_path / "m.csv").write_text(
        "path,product,extra\ndata/cam1/000.png,bolt,1\ndata/cam1/001.png,nut,2\ndata/cam2/000.png,bolt,3\n"
        "data/cam1/000.png,bolt,4\ndata/cam1/000.png,nut,5\n"
    )
    refs = collect_inputs([tmp_path / "m.csv"], batch=True)
    assert [(Path(r.path).relative_to(tmp_path).as_posix(), r.product) for r in refs] == [
        ("data/cam1/000.png", "bolt"),
        ("data/cam1/001.png", "nut"),
        ("data/cam2/000.png", "bolt"),
        ("data/cam1/000.png", "nut"),  # the same file for another product is another input
    ]
    assert [r.name for r in refs] == ["cam1/000", "cam1/001", "cam2/000", "cam1/000__2"]
    pq.write_table(pa.table({"path": [str(tmp_path / "data/cam2/000.png")]}), tmp_path / "m.parquet")
    (ref,) = collect_inputs([tmp_path / "m.parquet"], batch=True)
    assert ref.product is None and ref.path == str(tmp_path / "data/cam2/000.png")


def test_bad_manifests_are_refused_with_their_name(tmp_path: Path) -> None:
    (tmp_path / "nopath.csv").write_text("file\na.png\n")
    with pytest.raises(ConfigError, match=r"nopath.csv: a manifest needs a 'path' column"):
        collect_inputs([tmp_path / "nopath.csv"], batch=True)
    (tmp_path / "empty-row.csv").write_text('path\na.png\n""\n')
    with pytest.raises(ConfigError, match=r"empty-row.csv: row 2 has no path"):
        collect_inputs([tmp_path / "empty-row.csv"], batch=True)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"broken.parquet: not a readable PARQUET manifest"):
        collect_inputs([tmp_path / "broken.parquet"], batch=True)


def test_models_map_and_products_without_a_model(tmp_path: Path) -> None:
    for name in ("bolt", "nut"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "anomnet.json").write_text("{}")
    (tmp_path / "models" / "notes").mkdir()
    models = resolve_models(root=tmp_path / "models", named=[f"screw={tmp_path / 'models' / 'nut'}"])
    assert sorted(models, key=str) == ["bolt", "nut", "screw"]
    refs = [InputImage("/a.png", "a", "bolt"), InputImage("/b.png", "b", "washer"), InputImage("/c.png", "c", None)]
    with pytest.raises(ConfigError, match=r"no model for product\(s\) None, washer"):
        check_products(refs, models)
    check_products(refs, {**models, None: "x"})  # --model-dir covers the rest
    with pytest.raises(ModelFormatError, match="not a model folder"):
        resolve_models(named=[f"bolt={tmp_path}"])
    with pytest.raises(ConfigError, match="NAME=DIR"):
        resolve_models(named=["bolt"])
    with pytest.raises(ConfigError, match="no model"):
        resolve_models()


# -- the worker's scorer ---------------------------------------------------------------------------


def test_batch_scorer_uses_each_products_model_once_keeps_order_and_isolates_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _images(tmp_path / "in", 4)
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    loads: list[object] = []
    real_load = worker_mod.load_scorer

    def counting_load(model):  # noqa: ANN001, ANN202
        loads.append(model)
        if model == "broken-model":
            raise ModelFormatError("broken-model: damaged")
        if model == "needs-torch":
            raise ModuleNotFoundError("No module named 'torch'")
        return real_load(model)

    monkeypatch.setattr(worker_mod, "load_scorer", counting_load)
    bolt, nut = FakeScorer(0.0), FakeScorer(10.0)
    models = {"bolt": bolt, "nut": nut, "bad": "broken-model", "lean": "needs-torch"}
    scorer = BatchScorer(models, out=str(tmp_path / "out"))
    refs = [
        InputImage(str(paths[0]), "000", "bolt"),
        InputImage(str(paths[1]), "001", "nut"),
        InputImage(str(tmp_path / "in" / "bad.png"), "bad", "bolt"),
        InputImage(str(paths[2]), "002", "bad"),
        InputImage(str(paths[3]), "003", "bolt"),
        InputImage(str(paths[3]), "003__2", "lean"),
    ]
    for _ in range(2):
        table = scorer(inputs_table(refs))
    got = table.to_pylist()
    assert [r["path"] for r in got] == [r.path for r in refs] and [r["product"] for r in got] == [
        r.product for r in refs
    ]
    assert got[1]["score"] >= 10.0 > got[0]["score"]  # nut's model scored the nut image
    assert "bad.png" not in got[2]["error"] and got[2]["error"] and got[2]["score"] is None  # the read error
    assert got[3]["error"].startswith("model could not be loaded") and got[3]["score"] is None
    assert got[4]["error"] is None and dict(got[4]["outputs"])["mask"].endswith("out/masks/003.png")
    assert got[5]["error"] == "model could not be loaded: ModuleNotFoundError: No module named 'torch'"
    assert (tmp_path / "out" / "heatmaps" / "000.png").is_file()
    # each model loaded once in this worker (the broken one is tried again per batch: it stays an error row)
    assert loads.count(bolt) == 1 and loads.count(nut) == 1 and loads.count("broken-model") == 2


def test_batch_scorer_gives_an_unexpected_failure_to_the_failing_image_only(tmp_path: Path) -> None:
    class FailsOnWide(FakeScorer):
        def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if images.shape[2] == 12:
                raise RuntimeError("out of cheese")
            return super().score_arrays(images)

    paths = _images(tmp_path / "in", 3)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(paths[1])
    table = BatchScorer({None: FailsOnWide()})(inputs_table([InputImage(str(p), p.stem) for p in paths]))
    assert [r["error"] for r in table.to_pylist()] == [None, "could not be scored: RuntimeError: out of cheese", None]
    assert table.column("path").to_pylist() == [str(p) for p in paths]


# -- journal, finalisation, resume -----------------------------------------------------------------


def test_finalise_keeps_one_row_per_input_in_input_order(tmp_path: Path) -> None:
    refs = [InputImage(f"/img/{i}.png", str(i), "p" if i % 2 else None) for i in range(5)]

    def rows(idx: list[int], score: float) -> pa.Table:
        preds = [ImagePrediction(refs[i].path, score, 0.5, False, defect_pixels=0, regions=0) for i in idx]
        return rows_table(preds, [refs[i].product for i in idx])

    journal = Journal(tmp_path, flush_rows=2)
    journal.append(rows([3, 1], 1.0))  # flushed (2 rows)
    journal.append(rows([1], 2.0))  # the same input again (a block Ray ran twice): the later row wins
    journal.flush()
    journal.append(rows([0], 3.0))  # never flushed: lost with the driver, scored again by --resume
    assert done_keys(tmp_path) == {refs[1].key, refs[3].key}
    table = finalise(tmp_path, refs)
    assert table.column("path").to_pylist() == [refs[1].path, refs[3].path]
    assert table.column("score").to_pylist() == [2.0, 1.0]
    assert not (tmp_path / rows_mod.JOURNAL).exists()
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert csv[0] == "path,product,score,p_value,defective,threshold,defect_pixels,regions,error" and len(csv) == 3
    assert done_keys(tmp_path) == {refs[1].key, refs[3].key}  # the final results count for --resume too


def test_rows_carry_the_threshold_and_older_journals_read_without_it(tmp_path: Path) -> None:
    refs = [InputImage(f"/img/{i}.png", str(i), None) for i in range(3)]
    scored = ImagePrediction(refs[0].path, 0.7, 0.1, True, threshold=0.5, defect_pixels=4, regions=1)
    ((pred, _),) = rows_mod.predictions_of(rows_table([scored], [None]))
    assert pred.record() == scored.record()
    old = rows_table([ImagePrediction(r.path, 0.2, 0.5, False, threshold=0.5) for r in refs[1:]], [None, None])
    old = old.drop_columns(["threshold"])  # as written before rows carried the threshold
    rows_mod.write_parquet(tmp_path / rows_mod.RESULTS_PARQUET, old.slice(0, 1))
    rows_mod.write_parquet(tmp_path / rows_mod.JOURNAL / "part-0-000000.parquet", old.slice(1, 1))
    assert rows_mod.drop_damaged(tmp_path) == []  # readable, not damaged
    Journal(tmp_path, flush_rows=1).append(rows_table([scored], [None]))
    table = finalise(tmp_path, refs)
    assert table.column("threshold").to_pylist() == [0.5, None, None]
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].split(",")[4] == "threshold" and [line.split(",")[4] for line in lines[1:]] == ["0.5", "", ""]


# -- on Ray ----------------------------------------------------------------------------------------


@pytest.fixture
def ray_here(local_ray: None) -> None:
    """The session's local Ray; this module's classes go to the workers by value (they cannot import it)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _killing_scorer(marker: Path) -> type[BatchScorer]:
    class KillsItsWorkerOnce(BatchScorer):
        """Scores and writes its second batch, then kills its own process before returning the rows."""

        calls = 0

        def __call__(self, batch):  # noqa: ANN001, ANN204
            table = super().__call__(batch)
            self.calls += 1
            if self.calls == 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return table
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            return table

    return KillsItsWorkerOnce


def test_ray_every_input_one_row_after_a_killed_worker_and_per_product_models(ray_here: None, tmp_path: Path) -> None:
    from anomnet.engine.ray_predict import predict_on_ray

    paths = _images(tmp_path / "in", 40)
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    lines = ["path,product"] + [f"in/{p.name},{'bolt' if i % 3 else 'nut'}" for i, p in enumerate(paths)]
    (tmp_path / "m.csv").write_text("\n".join([*lines, "in/bad.png,bolt"]) + "\n")
    refs = collect_inputs([tmp_path / "m.csv"], batch=True)
    marker = tmp_path / "killed"
    summary = predict_on_ray(
        refs,
        {"bolt": FakeScorer(0.0), "nut": FakeScorer(10.0)},
        tmp_path / "out",
        workers=2,
        batch_size=4,
        progress=False,
        scorer_class=_killing_scorer(marker),
    )
    assert marker.is_file()  # a worker really died mid-run
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    keys = list(zip(table.column("product").to_pylist(), table.column("path").to_pylist()))
    assert keys == [r.key for r in refs] and len(set(keys)) == 41  # every input once, in input order
    by_path = {r["path"]: r for r in table.to_pylist()}
    assert by_path[str(tmp_path / "in" / "bad.png")]["error"] and by_path[str(paths[0])]["score"] >= 10.0
    assert by_path[str(paths[1])]["score"] < 10.0  # bolt's model
    assert summary.scored == 41 and summary.failed == 1 and not summary.missing
    assert not (tmp_path / "out" / rows_mod.JOURNAL).exists()
    assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 40
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 41

    # --resume: only the new inputs are scored, the final files hold every input once
    new = _images(tmp_path / "in", 5, start=40)
    more = collect_inputs([tmp_path / "m.csv", *map(str, new)], batch=True)
    again = predict_on_ray(
        more,
        {"bolt": FakeScorer(0.0), "nut": FakeScorer(10.0), None: FakeScorer()},
        tmp_path / "out",
        resume=True,
        workers=2,
        progress=False,
        image_outputs=False,  # --rows-only
    )
    assert again.resumed == 41 and again.scored == 5 and again.failed == 1
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert table.column("path").to_pylist() == [r.path for r in more]
    assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 40  # none for the rows-only run ...
    clear_previous_run(tmp_path / "out")  # ... and the first run's files stay listed as the output folder's own
    assert not (tmp_path / "out" / "masks").exists() and not (tmp_path / "out" / "results.parquet").exists()


def test_cli_engine_ray_with_a_fitted_model_bad_file_exit_3(
    local_ray: None, folder_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomnet.cli import EXIT_OK, EXIT_SOME_FAILED, main

    model = tmp_path / "model"
    fit = ["fit", "--data", str(folder_dataset), "--out", str(model), "--image-size", "64", "--quiet"]
    assert main([*fit, "--set", "batch_size=4"]) == EXIT_OK
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((folder_dataset / "test").rglob("*.png")):
        (images / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    (images / "zz-truncated.png").write_bytes((images / "good-g000.png").read_bytes()[:100])
    capsys.readouterr()
    out = tmp_path / "out"
    argv = ["predict", "--model-dir", str(model), str(images), "--out", str(out), "--engine", "ray", "--quiet"]
    assert main(argv) == EXIT_SOME_FAILED
    printed = capsys.readouterr()
    assert "images: 9 (9 scored now, 0 already done), failed: 1, missing: 0" in printed.out
    assert "1 of 9 images failed" in printed.err
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [Path(r["path"]).name for r in table] == sorted(p.name for p in images.iterdir())
    assert [r["error"] is not None for r in table] == [False] * 8 + [True]
    # the same scores as the local engine (one scoring step)
    local = {r.path: r.score for r in __import__("anomnet.api", fromlist=["predict"]).predict(model, [images])}
    for r in table[:8]:
        assert r["score"] == pytest.approx(local[r["path"]], rel=1e-5)
    assert len(list((out / "overlays").glob("*.png"))) == 8
    # another process joins this Ray cluster (--address) and resumes: one new image scored, nothing twice
    (images / "zz-new.png").write_bytes((images / "good-g001.png").read_bytes())
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "anomnet.cli", *argv, "--resume", "--address", address]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr
    assert "images: 10 (1 scored now, 9 already done), failed: 1" in proc.stdout
    assert len(pq.read_table(out / "results.parquet")) == 10 and len(list((out / "masks").glob("*.png"))) == 9


def test_cli_engine_options_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomnet.cli import EXIT_INPUT, main

    assert main(["predict", "--model", f"a={tmp_path}", str(tmp_path)]) == EXIT_INPUT
    assert "--model: only with --engine ray" in capsys.readouterr().err
    assert main(["predict", str(tmp_path)]) == EXIT_INPUT
    assert "--model-dir is required" in capsys.readouterr().err
    assert main(["predict", "--model-dir", str(tmp_path), str(tmp_path), "--engine", "ray"]) == EXIT_INPUT
    assert "--engine ray needs --out" in capsys.readouterr().err


def test_throughput_driver_reads_the_engines_summary_line() -> None:
    import importlib.util

    from anomnet.engine.ray_predict import RunSummary

    spec = importlib.util.spec_from_file_location(
        "ray_throughput", Path(__file__).resolve().parents[1] / "benchmarks" / "ray_throughput.py"
    )
    assert spec is not None and spec.loader is not None
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    summary = RunSummary(inputs=10, scored=10, startup_seconds=1.5, seconds=4.0, first_row_seconds=2.5, workers=2)
    parsed = driver._ray_summary("\n".join(summary.lines()))
    assert parsed == {"engine_s": 4.0, "workers": 2, "first_row_s": 2.5, "ray_start_s": 1.5, "engine_rate": 2.5}
    assert driver.command_line(["--images", "5"]) == "python benchmarks/ray_throughput.py --images 5"


def test_an_address_without_a_cluster_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray", reason="needs the anomnet[ray] extra")
    from anomnet.engine.ray_predict import ensure_ray

    def refuse(**kwargs: object) -> None:
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(
        ConfigError, match=r"--address ray-head.example:6379: no Ray cluster answers there .*RAY_AUTH_MODE"
    ):
        ensure_ray("ray-head.example:6379")


def test_ray_engine_failure_keeps_the_rows_for_resume(
    ray_here: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomnet.engine.ray_predict import EngineFailed, predict_on_ray

    monkeypatch.setattr(rows_mod, "FLUSH_ROWS", 1)  # every batch of rows the driver receives goes to a part file

    class BreaksOnceRowsAreKept(BatchScorer):
        """Scores slowly until the driver has journaled rows, then fails in a way no error row can absorb."""

        def __call__(self, batch):  # noqa: ANN001, ANN204
            assert self.out is not None
            if any((self.out / rows_mod.JOURNAL).glob("part-*.parquet")):
                raise RuntimeError("the engine itself breaks")
            time.sleep(0.3)
            return super().__call__(batch)

    refs = collect_inputs([_images(tmp_path / "in", 24)[0].parent], batch=True)
    out = tmp_path / "out"
    with pytest.raises(EngineFailed, match="run the same command with --resume"):
        predict_on_ray(
            refs, {None: FakeScorer()}, out, workers=1, batch_size=2, progress=False, scorer_class=BreaksOnceRowsAreKept
        )
    kept = done_keys(out)  # the rows received before the failure are in the journal
    assert 0 < len(kept) < 24 and not (out / "results.parquet").exists()
    summary = predict_on_ray(refs, {None: FakeScorer()}, out, resume=True, workers=1, progress=False)
    assert summary.resumed == len(kept) and summary.scored == 24 - len(kept) and not summary.missing
    assert pq.read_table(out / "results.parquet").column("path").to_pylist() == [r.path for r in refs]


# -- hostile inputs ---------------------------------------------------------------------------------


def test_threads_with_model_root_and_no_model_dir_is_no_type_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomnet.cli import EXIT_INPUT, main

    argv = ["--threads", "1", "predict", "--engine", "ray", "--model-root", str(tmp_path / "nowhere")]
    assert main([*argv, "--out", str(tmp_path / "out"), str(tmp_path)]) == EXIT_INPUT
    assert f"--model-root {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


class Died(BaseException):
    """Stands for the death of the worker process: nothing after it runs in that process."""


class DiesOnWide(FakeScorer):
    """Kills its 'process' on images 30 px wide (as a decoder crash or the out-of-memory killer would)."""

    def score_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if images.shape[2] == 30:
            raise Died
        return super().score_arrays(images)


def test_an_image_that_kills_every_worker_becomes_an_error_row_not_a_retry_loop(tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", 4)
    Image.fromarray(np.zeros((8, 30, 3), np.uint8)).save(paths[2])
    batch = inputs_table([InputImage(str(p), p.stem) for p in paths])
    attempts = str(tmp_path / "out" / rows_mod.JOURNAL / rows_mod.ATTEMPTS)
    deaths = 0
    for _ in range(worker_mod.MAX_ATTEMPTS + 2):  # Ray starts a new worker and gives it the batch again
        try:
            table = BatchScorer({None: DiesOnWide()}, attempts=attempts)(batch)
            break
        except Died:
            deaths += 1
    assert deaths == worker_mod.MAX_ATTEMPTS
    got = table.to_pylist()
    assert [r["path"] for r in got] == [str(p) for p in paths]
    assert [r["error"] is None for r in got] == [True, True, False, True]
    assert "died" in got[2]["error"] and "not tried again" in got[2]["error"]
    assert len(list(Path(attempts).iterdir())) == 1  # only the killer stays counted (finalise removes it)
    # the batch again (its rows lost on the way to the driver): the killer is not tried again, the others are
    again = BatchScorer({None: DiesOnWide()}, attempts=attempts)(batch)
    assert [r["error"] is None for r in again.to_pylist()] == [True, True, False, True]


def _killing_on_wide() -> type[BatchScorer]:
    class KillsItsWorkerOnWide(BatchScorer):
        """Kills its own process (SIGKILL) whenever it is given an image 30 px wide."""

        def _score_refs(self, refs):  # noqa: ANN001, ANN202
            for ref in refs:
                with Image.open(ref.path) as im:
                    if im.width == 30:
                        os.kill(os.getpid(), signal.SIGKILL)
            return super()._score_refs(refs)

    return KillsItsWorkerOnWide


def test_ray_an_image_that_kills_its_worker_ends_as_an_error_row(ray_here: None, tmp_path: Path) -> None:
    from anomnet.engine.ray_predict import predict_on_ray

    paths = _images(tmp_path / "in", 8)
    Image.fromarray(np.zeros((8, 30, 3), np.uint8)).save(paths[5])
    refs = collect_inputs([tmp_path / "in"], batch=True)
    summary = predict_on_ray(
        refs,
        {None: FakeScorer()},
        tmp_path / "out",
        workers=1,
        batch_size=4,
        progress=False,
        image_outputs=False,
        scorer_class=_killing_on_wide(),
    )
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["path"] for r in table] == [r.path for r in refs] and not summary.missing
    assert [r["error"] is None for r in table] == [True] * 5 + [False] + [True] * 2
    assert "died" in table[5]["error"] and summary.failed == 1
    assert not (tmp_path / "out" / rows_mod.JOURNAL).exists()


def test_resume_with_a_damaged_results_file_or_journal_part_says_so_and_scores_them_again(
    ray_here: None, tmp_path: Path
) -> None:
    from anomnet.engine.ray_predict import predict_on_ray

    refs = collect_inputs([_images(tmp_path / "in", 6)[0].parent], batch=True)
    out = tmp_path / "out"
    predict_on_ray(refs, {None: FakeScorer()}, out, workers=1, progress=False, image_outputs=False)
    final = out / "results.parquet"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # a copy that stopped halfway
    journal = Journal(out)
    journal.append(rows_table([ImagePrediction(refs[0].path, 0.1, 0.5, False, defect_pixels=0, regions=0)], [None]))
    journal.flush()
    (part,) = (out / rows_mod.JOURNAL).glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:40])
    notes: list[str] = []
    summary = predict_on_ray(
        refs, {None: FakeScorer()}, out, resume=True, workers=1, progress=False, image_outputs=False, note=notes.append
    )
    assert len(notes) == 2 and all("cannot be read" in n and "scored again" in n for n in notes), notes
    assert "results of the earlier run" in notes[0] and "a journal part" in notes[1]
    assert summary.resumed == 0 and summary.scored == 6 and not summary.missing
    assert pq.read_table(final).column("path").to_pylist() == [r.path for r in refs]
