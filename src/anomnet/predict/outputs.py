"""What ``anomnet predict`` / ``api.predict`` produce for each image, and the files they write.

Per image: score, conformal p-value, decision with the image threshold it was made with, and the
defect mask of the model's one verdict (:meth:`~anomnet.decisions.calibration.Calibration.verdict`: none for an
image called good; for a defective one the pixel threshold's mask, post-processed as the model's
calibration says, and at least the region of its maximum). With an output folder::

    OUT/
      results.csv         one row per input: path, score, p_value, defective, threshold, defect_pixels, regions,
                          error
      results.jsonl       the same as JSON lines, plus each region's bounding box and the paths of the
                          files written for the image
      colour-scale.png    the model's fixed heat-map colour scale with its numbers and the pixel threshold
                          marked (one picture for every heat map and overlay of the run; predict only)
      heatmaps/<name>.png colour heat map (the model's fixed scale, see visualize.py)
      overlays/<name>.png heat map blended over the image, the mask's contour drawn in white
      masks/<name>.png    binary defect mask, 0 / 255, at the image's original resolution (all 0: called good)
      maps/<name>.tiff    raw float32 anomaly map at the original resolution (only with raw_maps;
                          MVTec AD 2's submission format for anomaly images)

``<name>`` is the image's path relative to the folder it was found in (subfolders kept,
extension dropped), or its file name without extension when the file was given directly;
a name taken twice gets the first free ``__2``, ``__3``... that no other input's name uses, so
no image's outputs can replace another's. A file that cannot be read gets its reason in
``error`` and no image outputs; the others are still written. All files are written
atomically (temporary file + rename). ``OUT/.anomnet-outputs.json`` lists the files the last
run wrote: a new run into the same folder first removes those (and only those), so no stale
heat map of an earlier run survives next to the new results.

The files are encoded and written beside scoring by :class:`OutputWriter`, a bounded pool of threads
(PNG encoding in numpy and zlib runs without the GIL), with the PNG settings of :data:`PNG_SETTINGS`;
``predict``, the hot folder and the batch engine's workers all write through it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from anomnet import durable, imageio
from anomnet.decisions.calibration import Calibration
from anomnet.errors import AnomnetError, ConfigError, ImageReadError
from anomnet.predict.inputs import InputImage, collect_inputs
from anomnet.predict.scoring import (
    EXPORT_MANIFEST,
    MODEL_META,
    ImagePrediction,
    ImageRef,
    Scorer,
    load_scorer,
    score_refs,
)
from anomnet.predict.visualize import colour_bar, draw_contour, heatmap, overlay

if TYPE_CHECKING:
    from anomnet.detectors.base import Detector
    from anomnet.predict.shard import Shard

CSV_COLUMNS = ("path", "score", "p_value", "defective", "defect_pixels", "regions", "error")
"""The columns every results.csv shares (``predict``'s, the hot folder's and the batch engine's)."""
PREDICT_CSV_COLUMNS = ("path", "score", "p_value", "defective", "threshold", "defect_pixels", "regions", "error")
"""``predict``'s results.csv: the decision with the image threshold it was made with."""


OWNED_FILES = ".anomnet-outputs.json"
COLOUR_SCALE = "colour-scale.png"
"""The run's legend: every heat map and overlay of a run shares the model's fixed colour scale."""
COLOUR_SCALE_HEIGHT = 400


def clear_previous_run(out: Path) -> None:
    """Remove the files the previous run listed in ``OUT/.anomnet-outputs.json`` (nothing else)."""
    manifest = out / OWNED_FILES
    if not manifest.is_file():
        return
    try:
        owned = json.loads(manifest.read_text())
        files = [str(f) for f in owned.get("files", [])] if isinstance(owned, dict) else []
    except (OSError, ValueError):
        files = []
    root = Path(os.path.realpath(out))
    folders: set[Path] = set()
    for rel in files:
        target = Path(os.path.realpath(out / rel))
        if target.is_relative_to(root) and target.is_file():
            target.unlink()
            folders.update(p for p in target.parents if p.is_relative_to(root) and p != root)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        with suppress(OSError):
            folder.rmdir()  # only folders the run's files left empty; one holding anything else stays
    manifest.unlink()


def claim_outputs(out: Path, inputs: list[InputImage], raw_maps: bool, summaries: Iterable[str] = ()) -> None:
    """List every file this run may write before writing any (a killed run's files are still known).

    ``summaries``: result files besides results.csv and results.jsonl (e.g. the batch engine's results.parquet).
    """
    files = dict.fromkeys(["results.csv", "results.jsonl", *summaries])  # each once, in order
    for item in inputs:
        files.update(dict.fromkeys(str(f.relative_to(out)) for f in output_files(out, item.name, raw_maps).values()))
    imageio.atomic_write_text(out / OWNED_FILES, json.dumps({"files": list(files)}, indent=1))


def output_files(out: Path, name: str, raw_maps: bool) -> dict[str, Path]:
    """The files written for the image named ``name``."""
    files = {
        "heatmap": out / "heatmaps" / f"{name}.png",
        "overlay": out / "overlays" / f"{name}.png",
        "mask": out / "masks" / f"{name}.png",
    }
    if raw_maps:
        files["map"] = out / "maps" / f"{name}.tiff"
    return files


def model_folder_files(folder: str | Path) -> list[Path]:
    """What a model folder (fitted or exported) holds: outputs are never written over or inside it."""
    folder = Path(folder)
    return [folder / MODEL_META, folder / EXPORT_MANIFEST] + (sorted(folder.iterdir()) if folder.is_dir() else [])


def predict_files(
    model: Detector | Scorer | str | Path,
    images: Iterable[str | Path],
    keep_maps: bool = False,
    out_dir: str | Path | None = None,
    raw_maps: bool = False,
    progress: bool = False,
    shard: str | Shard | None = None,
    out_layout: str = "anomnet",
) -> list[ImagePrediction]:
    """``api.predict`` (see there) without torch: an exported model folder scores with no torch imported.

    The output folder is checked before any work (never over an input or the model, never inside a
    scanned folder); ``out_layout="mvtec-ad2"`` writes MVTec AD 2's submission layout instead.
    """
    from anomnet.predict.shard import Shard
    from anomnet.predict.submission import LAYOUTS, predict_submission

    if out_layout not in LAYOUTS:
        raise ConfigError(f"unknown output layout {out_layout!r}; use one of: {', '.join(LAYOUTS)}")
    if out_layout != "anomnet" and (out_dir is None or shard is not None):
        raise ConfigError(f"the {out_layout} output layout needs an output folder (--out) and takes no --shard")
    images = list(images)
    picked = Shard.parse(shard) if isinstance(shard, str) else shard
    if out_dir is not None:  # checked before any work: never over an input, never inside a scanned folder
        protected = [Path(i) for i in images if str(i) != "-"]
        if isinstance(model, (str, Path)):
            protected += model_folder_files(model)
        imageio.check_not_input(out_dir, protected, "out_dir", folder=True)
        imageio.check_writable(out_dir, "out_dir", folder=True)
    if out_layout == "mvtec-ad2" and out_dir is not None:
        return predict_submission(load_scorer(model), images, out_dir, progress)
    return predict_images(load_scorer(model), images, out_dir, raw_maps, keep_maps, progress, shard=picked)


def predict_images(
    model: Detector | Scorer | str | Path,
    images: Iterable[str | Path],
    out_dir: str | Path | None = None,
    raw_maps: bool = False,
    keep_maps: bool = False,
    progress: bool = False,
    stdin: TextIO | None = None,
    shard: Shard | None = None,
) -> list[ImagePrediction]:
    """Score every image (:func:`anomnet.predict.scoring.score_refs`); with ``out_dir`` write the files described above.

    ``model``: a fitted detector, a scorer, or a fitted or exported model folder. ``shard``: score only
    this shard of the expanded inputs (:mod:`anomnet.predict.shard`; output names as in the whole list).
    """
    scorer = load_scorer(model)
    inputs = collect_inputs(images, stdin)
    if shard is not None:
        inputs = shard.select(inputs)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        clear_previous_run(out)
        claim_outputs(out, inputs, raw_maps, summaries=[COLOUR_SCALE])
        imageio.write_png(out / COLOUR_SCALE, colour_bar(scorer.calibration, COLOUR_SCALE_HEIGHT)[0])
    bar = _progress_bar(len(inputs), progress)
    results = score_and_write(scorer, inputs, out, raw_maps, keep_maps, progress=bar.update if bar else None)
    if bar is not None:
        bar.close()
    if out is not None:
        write_summaries(results, out)
    return results


def score_and_write(
    scorer: Scorer,
    inputs: list[InputImage],
    out: Path | None,
    raw_maps: bool = False,
    keep_maps: bool = False,
    writer: OutputWriter | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[ImagePrediction]:
    """One row per input (:func:`~anomnet.predict.scoring.score_refs`); with ``out``, each scored image's files too.

    The step every batch path shares (``predict`` here, the hot folder, the batch engine's workers):
    outputs that cannot be written put their reason in the row's ``error`` (the score stays). The
    inputs are scored ``scorer.batch_size`` at a time; the next batch is decoded on another thread
    meanwhile, and each batch's files are handed to ``writer`` (an :class:`OutputWriter` for ``out``),
    so they are written while the next batch is scored. Without a ``writer`` one is used for this call
    and every file is written when it returns; with one, a row's ``outputs`` (or ``error``) are final
    once ``writer.finish()`` returned. ``progress`` is called with each batch's size once it is scored.
    """
    size = max(1, scorer.batch_size)
    batches = [inputs[start : start + size] for start in range(0, len(inputs), size)]
    rows: list[ImagePrediction] = []
    with ExitStack() as stack:
        if out is not None and writer is None:
            writer = stack.enter_context(OutputWriter(out, raw_maps))
        reader = stack.enter_context(ThreadPoolExecutor(1, "anomnet-read")) if len(batches) > 1 else None
        ahead = reader.submit(_decoded, batches[0]) if reader is not None else None
        for k, batch in enumerate(batches):
            refs = ahead.result() if ahead is not None else [ImageRef(str(item.path)) for item in batch]
            if reader is not None and k + 1 < len(batches):
                ahead = reader.submit(_decoded, batches[k + 1])  # decoded while this batch is scored
            scored = score_refs(scorer, refs, keep_maps=True, keep_images=writer is not None)
            for item, row in zip(batch, scored):
                if writer is not None and row.image is not None:  # scored: image, map and mask kept
                    writer.submit(row, item.name, scorer.calibration, keep_maps)
                elif not keep_maps:
                    row.anomaly_map = row.mask = None
            rows.extend(scored)
            if progress is not None:
                progress(len(batch))
    return rows


def _decoded(batch: list[InputImage]) -> list[ImageRef]:
    """References carrying their decoded pixels; a file that cannot be read is left for ``score_refs`` to refuse."""
    refs = []
    for item in batch:
        try:
            refs.append(ImageRef(str(item.path), imageio.read_image(item.path)))
        except ImageReadError:  # read again by score_refs, which makes its error row
            refs.append(ImageRef(str(item.path)))
    return refs


PNG_SETTINGS: dict[str, tuple[int, int]] = {
    "heatmap": (4, zlib.Z_DEFAULT_STRATEGY),
    "overlay": (1, zlib.Z_RLE),
    "mask": (1, zlib.Z_RLE),
}
"""(zlib level, zlib strategy) of each PNG output, chosen by measurement (docs/design.md, "Output files")."""

WRITER_THREADS = min(4, max(2, os.cpu_count() or 1))
"""Threads of an :class:`OutputWriter` (at least 2: a thread also waits on the disk's fsync)."""


class OutputWriter:
    """Encodes and writes each scored image's files on a bounded pool of threads, beside scoring.

    :meth:`submit` hands over one row (its decoded image, map and mask) and returns at once, unless
    ``pending`` images are already waiting: then it first settles the oldest, so memory stays flat
    however many images a run scores. Settling a row sets its ``outputs`` to the files written, or
    its ``error`` to why they could not be (a failing write fails only that image); any other
    exception is raised by :meth:`finish`. The files are the same as :func:`write_image_outputs`'
    (same pixels, same settings), each written once, atomically.
    """

    def __init__(self, out: Path, raw_maps: bool = False, threads: int | None = None, pending: int | None = None):
        self.out = Path(out)
        self.raw_maps = raw_maps
        durable.file_mode()  # the umask is read once, here: reading it from several threads at once is not safe
        threads = WRITER_THREADS if threads is None else max(1, threads)
        self.pending = 2 * threads if pending is None else max(1, pending)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="anomnet-outputs")
        self._queue: deque[tuple[ImagePrediction, Future[dict[str, str]]]] = deque()

    def submit(self, row: ImagePrediction, name: str, cal: Calibration, keep_maps: bool = False) -> None:
        """Write the files of ``row`` (scored, with its image) as ``name``; the row drops its image now."""
        image, amap, mask = row.image, row.anomaly_map, row.mask
        assert image is not None and amap is not None and mask is not None, "a scored row with its image"
        while len(self._queue) >= self.pending:
            self._settle_oldest()
        row.image = None
        if not keep_maps:
            row.anomaly_map = row.mask = None
        job = self._pool.submit(write_image_outputs, self.out, name, image, amap, mask, cal, self.raw_maps)
        self._queue.append((row, job))

    def _settle_oldest(self) -> None:
        row, job = self._queue.popleft()
        try:
            row.outputs = job.result()
        except (OSError, AnomnetError) as exc:
            row.error = f"outputs could not be written: {exc}"

    def finish(self) -> None:
        """Wait until every submitted row is settled (each written, or its error set)."""
        while self._queue:
            self._settle_oldest()

    def close(self) -> None:
        """Settle what is pending (errors of unexpected kinds are not raised here) and stop the threads."""
        while self._queue:
            with suppress(Exception):
                self._settle_oldest()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


def _progress_bar(total: int, enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", file=sys.stderr, mininterval=1.0)


def write_image_outputs(
    out: Path, name: str, image: np.ndarray, amap: np.ndarray, mask: np.ndarray, cal: Calibration, raw_maps: bool
) -> dict[str, str]:
    """Heat map, overlay with the mask's contour, mask (and raw map) of one image; returns their paths."""
    files = output_files(out, name, raw_maps)
    imageio.write_png(files["heatmap"], heatmap(amap, cal), *PNG_SETTINGS["heatmap"])
    imageio.write_png(files["overlay"], draw_contour(overlay(image, amap, cal), mask), *PNG_SETTINGS["overlay"])
    imageio.write_png(files["mask"], mask.astype(np.uint8) * 255, *PNG_SETTINGS["mask"])
    if raw_maps:
        imageio.write_tiff(files["map"], np.asarray(amap, dtype=np.float32))
    return {k: str(v) for k, v in files.items()}


def write_summaries(results: list[ImagePrediction], out: Path) -> None:
    """``results.csv`` and ``results.jsonl`` in ``out``."""
    imageio.atomic_write_text(out / "results.jsonl", "".join(json.dumps(r.record()) + "\n" for r in results))
    imageio.atomic_write_text(out / "results.csv", csv_text(results))


def csv_text(results: list[ImagePrediction]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PREDICT_CSV_COLUMNS)
    for r in results:
        rec = r.record()
        w.writerow(["" if rec[c] is None else rec[c] for c in PREDICT_CSV_COLUMNS])
    return buf.getvalue()
