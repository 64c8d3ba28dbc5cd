"""MVTec AD 2's submission layout for ``anomnet predict --out-layout mvtec-ad2`` / ``api.predict(out_layout=...)``.

The evaluation server (https://benchmark.mvtec.com) reads two folder trees of one structure::

    OUT/
      anomaly_images/<object>/<split>/<stem>.tiff               raw anomaly map, float16, one channel
      anomaly_images_thresholded/<object>/<split>/<stem>.png    binary mask, 0 / 255, one channel

``<object>/<split>/<stem>`` is the image's path relative to the dataset root without its
extension, e.g. ``can/test_private/000_regular``; for the labelled ``test_public`` split the
``good/`` or ``bad/`` folder stays in it (``can/test_public/bad/000_overexposed``), which is how
MVTec's own dataset class names the outputs for a local evaluation. Sources, both by MVTec:
``get_relative_anomaly_image_out_path`` in ``mvtec_ad_2_public_offline.py`` (the output path is
the image's path relative to the dataset root, suffix ``.tiff`` under ``anomaly_images`` or
``.png`` under ``anomaly_images_thresholded``) and ``check_and_prepare_data_for_upload.py`` /
``utils.py`` (only ``test_private`` and ``test_private_mixed`` of all eight objects in an upload,
no other file or folder; maps single-channel float16; masks single-channel with values in
{0, 255}). See docs/mvtec_ad2.md.

The object and split are read from each image's path: the last folder named ``test_public``,
``test_private`` or ``test_private_mixed`` and the folder above it. Files below a split's
``ground_truth/`` folder are masks and are skipped (``test_public`` can be given as a whole). Maps are written at the
image's resolution, cast to float16 (values beyond its range are clipped to +-65504); masks are
the model's pixel threshold and post-processing, as everywhere in anomnet. Nothing else is
written into ``OUT`` (the server's checker refuses any other file), so one submission folder
collects the runs of every object's model; a file of the same name is replaced.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from anomnet import imageio
from anomnet.errors import AnomnetError, ConfigError
from anomnet.predict.inputs import collect_inputs
from anomnet.predict.scoring import ImagePrediction, ImageRef, Scorer, load_scorer, score_refs

if TYPE_CHECKING:
    from anomnet.detectors.base import Detector

LAYOUTS = ("anomnet", "mvtec-ad2")
SPLITS = ("test_public", "test_private", "test_private_mixed")
MAPS_DIR = "anomaly_images"
MASKS_DIR = "anomaly_images_thresholded"
GROUND_TRUTH = "ground_truth"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def relative_name(path: str | Path) -> PurePosixPath:
    """``<object>/<split>/.../<stem>`` of an image inside an MVTec AD 2 object's test split."""
    parts = Path(path).absolute().parts
    at = max((i for i, p in enumerate(parts[:-1]) if p in SPLITS and i > 0), default=None)
    if at is None:
        raise ConfigError(
            f"{path}: not inside an MVTec AD 2 test split (<object>/{'|'.join(SPLITS)}/...): the submission "
            "layout names every output by the image's object and split"
        )
    return PurePosixPath(*parts[at - 1 : -1], Path(parts[-1]).stem)


def submission_files(out: str | Path, name: PurePosixPath) -> dict[str, Path]:
    """The map (TIFF) and mask (PNG) files of the image named ``name`` (see :func:`relative_name`)."""
    out = Path(out)
    return {"map": out / MAPS_DIR / f"{name}.tiff", "mask": out / MASKS_DIR / f"{name}.png"}


def map_float16(amap: np.ndarray) -> np.ndarray:
    """The anomaly map as the server's float16 (clipped to its finite range)."""
    return np.clip(np.asarray(amap, dtype=np.float32), -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def predict_submission(
    model: Detector | Scorer | str | Path, images: Iterable[str | Path], out_dir: str | Path, progress: bool = False
) -> list[ImagePrediction]:
    """Score every image (:func:`~anomnet.predict.scoring.score_refs`); write its map and mask in the submission layout.

    ``model``: a fitted detector, a scorer, or a fitted or exported model folder. Every input's name
    is checked before any work: two inputs with the same object, split and stem (``x.png`` and
    ``x.jpg``) would write one file, and an image outside a test split has no name.
    """
    scorer = load_scorer(model)
    # a split's ground_truth/ folder holds masks, not test images (MVTec's own pattern takes good/ and bad/)
    inputs = [item for item in collect_inputs(images) if GROUND_TRUTH not in relative_name(item.path).parts]
    names: dict[PurePosixPath, str] = {}
    for item in inputs:
        name = relative_name(item.path)
        if name in names:
            raise ConfigError(f"{item.path} and {names[name]} would both be written as {name}.tiff")
        names[name] = item.path
    order = list(names)
    results: list[ImagePrediction] = []
    for start in _progress(range(0, len(inputs), scorer.batch_size), len(inputs), scorer.batch_size, progress):
        chunk = inputs[start : start + scorer.batch_size]
        rows = score_refs(scorer, [ImageRef(str(item.path)) for item in chunk], keep_maps=True)
        for name, row in zip(order[start : start + len(chunk)], rows):
            if row.error is None and row.anomaly_map is not None and row.mask is not None:
                files = submission_files(out_dir, name)
                try:
                    imageio.write_tiff(files["map"], map_float16(row.anomaly_map))
                    imageio.write_png(files["mask"], row.mask.astype(np.uint8) * 255)
                    row.outputs = {k: str(v) for k, v in files.items()}
                except (OSError, AnomnetError) as exc:
                    row.error = f"outputs could not be written: {exc}"
            row.anomaly_map = row.mask = None
            results.append(row)
    return results


def _progress(starts: range, total: int, step: int, enabled: bool) -> Iterator[int]:
    if not enabled:
        yield from starts
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="predict", unit="img", file=sys.stderr, mininterval=1.0) as bar:
        for start in starts:
            yield start
            bar.update(min(step, total - start))
