"""Dataset loaders: which images to train on, validate on and test on.

Training uses good images only; the validation images are good images carved from the
training images (never from the test set); the test set holds good and defective images,
with a pixel mask per defective image where the dataset has one.

Three layouts are understood (:func:`load_dataset` detects them with ``layout="auto"``):

**MVTec AD** (also MPDD, MVTec AD 2 and BTAD)::

    bottle/
      train/good/                     good training images
      test/good/                      good test images
      test/<defect>/                  defective test images, one folder per defect type
      ground_truth/<defect>/<stem>_mask.png   (or <stem>.png / .bmp / .tif)

  Pass the category folder, or the dataset root together with ``category="bottle"``.
  BTAD names the good folders ``ok`` instead of ``good``.

**MVTec AD 2** is read by the same loader::

    can/
      train/good/                     good training images
      validation/good/                good validation images: THE validation split (no training
                                      image is held out; ``val_fraction=0`` turns validation off)
      test_public/good/, test_public/bad/            the labelled test split
      test_public/ground_truth/bad/<stem>_mask.png   its masks
      test_private/, test_private_mixed/             unlabelled test images (flat folders)

  ``test_public`` is the test set of ``anomnet test``; the unlabelled splits are listed in
  :attr:`DatasetSplit.unlabelled` (``anomnet predict --out-layout mvtec-ad2`` writes their
  maps for the evaluation server, see :mod:`anomnet.predict.submission`).

**Generic folders**::

    mydata/
      train/              good images (flat, or in subfolders: read recursively)
      test/               optional (without it there is nothing to evaluate)
        good/             good test images
        scratch/          defective test images, one folder per defect type
        dent/             (any name other than "good")
      masks/              optional: masks of defective test images, matched by file stem:
        001.png           flat: <stem>.png or <stem>_mask.png ...
        scratch/001.png   ... or per defect type: masks/<defect>/<stem>[_mask].png

  A flat ``masks/`` needs the stems of the defective test images to be unique; if two
  images share a stem (``test/scratch/001.png`` and ``test/dent/001.png``) use per-defect
  mask folders.

**ELPV** (solar-cell electroluminescence images from the ``elpv-dataset`` package): pass
the literal path ``"elpv"``. The 2,624 cells of 300x300 pixels are labelled with a defect
probability; cells of probability 0 are good (1,508), of probability 1 defective (715), the
uncertain 1/3 and 2/3 cells are left out. The good cells are split (seeded) into 60 %
training, 10 % validation and 30 % test (905 / 151 / 452); the test set holds those good
cells plus every defective cell. ELPV has no masks.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomnet.errors import ConfigError, DatasetError
from anomnet.imageio import IMAGE_EXTENSIONS, list_images, read_image, read_mask, to_tensor
from anomnet.install import pip_command

LAYOUTS = ("auto", "mvtec", "folder", "elpv")
GOOD = "good"
_GOOD_NAMES = ("good", "ok")  # MVTec AD / MPDD / MVTec AD 2, BTAD
UNLABELLED_SPLITS = ("test_private", "test_private_mixed")  # MVTec AD 2's test images without labels
_MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
ELPV_FRACTIONS = (0.6, 0.1, 0.3)
"""Train / validation / test fractions of the good ELPV cells."""


@dataclass(frozen=True)
class Sample:
    """One image: its file, label (0 good, 1 anomalous), mask file and defect type."""

    path: Path
    label: int
    mask_path: Path | None = None
    defect_type: str = GOOD


@dataclass
class DatasetSplit:
    """A dataset cut into good training images, good validation images and test images."""

    name: str
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    warnings: list[str] = field(default_factory=list)
    """Notes for the user, e.g. defective test images that have no mask."""
    unlabelled: dict[str, list[Path]] = field(default_factory=dict)
    """Test images without labels by split name (MVTec AD 2: ``test_private``, ``test_private_mixed``)."""


@dataclass
class Batch:
    """Images of one size, with their samples, optional masks and original sizes."""

    images: torch.Tensor
    """``[B,3,H,W]`` float32 in [0, 1]."""
    samples: list[Sample]
    masks: torch.Tensor | None
    """``[B,H,W]`` bool at the images' original resolution (all False without a mask file)."""
    original_hw: list[tuple[int, int]]


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def load_dataset(
    path: str | Path,
    category: str | None = None,
    layout: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    cell_type: str | None = None,
) -> DatasetSplit:
    """Load a dataset in one of the layouts described in this module's docstring.

    Args:
        path: a dataset folder, or the literal ``"elpv"``.
        category: with an MVTec-style root, the category folder to use (e.g. ``"bottle"``).
        layout: ``"auto"`` (detect), ``"mvtec"``, ``"folder"`` or ``"elpv"``.
        val_fraction: share of the good training images held out for validation, in [0, 1)
            (MVTec and folder layouts; ELPV has its fixed 60/10/30 split).
        seed: seeds the validation split (and the ELPV split).
        cell_type: ELPV only: ``"mono"``, ``"poly"`` or ``None`` for both.

    Raises:
        DatasetError: a missing folder, an unknown layout, no images, ambiguous masks.
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    _check_fraction(val_fraction)
    if layout == "elpv" or (layout == "auto" and str(path) == "elpv"):
        return load_elpv(None if str(path) == "elpv" else path, seed=seed, cell_type=cell_type)
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (a dataset is a folder, see the accepted layouts in the docs)")
    if layout == "mvtec":
        category_dir = _mvtec_category_dir(root, category, strict=True)
        if category_dir is None:
            raise DatasetError(f"{root}: not an MVTec AD category folder or root")
        return load_mvtec(category_dir, val_fraction, seed)
    if layout == "folder":
        return load_folder(root, val_fraction, seed)
    return _load_auto(root, category, val_fraction, seed, cell_type)


def _load_auto(root: Path, category: str | None, val_fraction: float, seed: int, cell_type: str | None) -> DatasetSplit:
    category_dir = _mvtec_category_dir(root, category, strict=False)
    if category_dir is not None:
        return load_mvtec(category_dir, val_fraction, seed)
    if (root / "train").is_dir():
        return load_folder(root, val_fraction, seed)
    if (root / "labels.csv").is_file() and (root / "images").is_dir():
        return load_elpv(root, seed=seed, cell_type=cell_type)
    categories = _mvtec_categories(root)
    if categories:
        raise DatasetError(
            f"{root}: looks like the root of an MVTec-style dataset; choose a category "
            f"(--category / category=): {', '.join(categories)}"
        )
    raise DatasetError(
        f"{root}: not a known dataset layout. Accepted: an MVTec-style category folder "
        f"(train/good/, test/<defect>/, optional ground_truth/), its root plus a category, "
        f"a generic folder (train/ with good images, optional test/good/ and test/<defect>/, "
        f'optional masks/), or "elpv"'
    )


# --------------------------------------------------------------------------------------
# validation split
# --------------------------------------------------------------------------------------


def _check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise DatasetError(f"the validation fraction must be in [0, 1), got {fraction!r}")


def split_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into ``(train, validation)``, seeded and independent of input order.

    ``round(fraction * n)`` samples (at least one when ``fraction > 0`` and ``n >= 2``, at
    most ``n - 1``) go to validation. Both lists come back sorted by path.

    Raises:
        DatasetError: ``fraction`` is not in [0, 1).
    """
    _check_fraction(fraction)
    ordered = sorted(samples, key=_sample_key)
    n = len(ordered)
    if fraction == 0 or n < 2:
        return ordered, []
    n_val = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [s for i, s in enumerate(ordered) if i not in chosen]
    validation = [s for i, s in enumerate(ordered) if i in chosen]
    return train, validation


def _sample_key(sample: Sample) -> tuple[str, int, str, str]:
    return (str(sample.path), sample.label, sample.defect_type, str(sample.mask_path))


# --------------------------------------------------------------------------------------
# MVTec AD layout
# --------------------------------------------------------------------------------------


def _good_dir(folder: Path) -> Path | None:
    for name in _GOOD_NAMES:
        if (folder / name).is_dir():
            return folder / name
    return None


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train").is_dir() and _good_dir(folder / "train") is not None and _test_dir(folder) is not None


def _test_dir(folder: Path) -> Path | None:
    for name in ("test", "test_public"):
        if (folder / name).is_dir():
            return folder / name
    return None


def _mvtec_categories(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_mvtec_category(p))
    except OSError:
        return []


def _mvtec_category_dir(root: Path, category: str | None, strict: bool) -> Path | None:
    """The MVTec category folder meant by ``root`` (+ ``category``); ``None`` if not MVTec (auto)."""
    if category:
        if _is_mvtec_category(root / category):
            return root / category
        if root.name == category and _is_mvtec_category(root):
            return root
        found = _mvtec_categories(root)
        listed = f"; categories found: {', '.join(found)}" if found else ""
        raise DatasetError(f"{root}: no category {category!r} with train/good/ and test/ folders{listed}")
    if _is_mvtec_category(root):
        generic_masks = (root / "masks").is_dir() and not (root / "ground_truth").is_dir()
        if strict or not generic_masks:  # auto: train/good + test/ + masks/ is the generic layout
            return root
    if not strict:
        return None
    found = _mvtec_categories(root)
    if found:
        raise DatasetError(
            f"{root}: an MVTec-style root; choose a category (--category / category=): {', '.join(found)}"
        )
    raise DatasetError(f"{root}: not an MVTec-style category folder (needs train/good/ and test/<defect>/ folders)")


def load_mvtec(category_dir: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    """Load one category of an MVTec AD-style dataset (see the module docstring)."""
    category_dir = Path(category_dir)
    good_train = _good_dir(category_dir / "train")
    test_dir = _test_dir(category_dir)
    if good_train is None or test_dir is None:
        raise DatasetError(f"{category_dir}: not an MVTec-style category folder (needs train/good/ and test/)")
    warnings: list[str] = []
    train = [Sample(p, 0) for p in list_images(good_train)]
    official_val = _good_dir(category_dir / "validation")
    if official_val is not None and val_fraction > 0:
        validation = [Sample(p, 0) for p in list_images(official_val)]
    else:
        train, validation = split_validation(train, val_fraction, seed)
    gt_root = next((d / "ground_truth" for d in (category_dir, test_dir) if (d / "ground_truth").is_dir()), None)
    test: list[Sample] = []
    missing: list[Path] = []
    for defect_dir in _subfolders(test_dir, skip=("ground_truth",)):
        images = list_images(defect_dir)
        if defect_dir.name in _GOOD_NAMES:
            test.extend(Sample(p, 0) for p in images)
            continue
        index = _MaskIndex(gt_root / defect_dir.name) if gt_root is not None else None
        for image in images:
            mask = index.find(image.stem) if index is not None else None
            if mask is None:
                missing.append(image)
            test.append(Sample(image, 1, mask, defect_dir.name))
    if not test:
        raise DatasetError(f"{test_dir}: no test folders (expected good/ and one folder per defect type)")
    if missing:
        where = f"in {gt_root}" if gt_root is not None else f"(no ground_truth/ folder in {category_dir})"
        warnings.append(_missing_masks_note(missing, where))
    unlabelled: dict[str, list[Path]] = {}
    for name in UNLABELLED_SPLITS:
        if (category_dir / name).is_dir():
            try:
                unlabelled[name] = list_images(category_dir / name)
            except DatasetError as exc:  # an empty unlabelled split does not stop fit or test
                warnings.append(str(exc))
    return DatasetSplit(f"mvtec:{category_dir.name}", train, validation, test, warnings, unlabelled)


def _subfolders(folder: Path, skip: Sequence[str] = ()) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in skip)


def _missing_masks_note(missing: list[Path], where: str) -> str:
    shown = ", ".join(str(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
    return f"{len(missing)} defective test image(s) have no mask {where}; pixel metrics leave them out: {shown}"


class _MaskIndex:
    """Mask files of one folder, looked up by image stem (``<stem>_mask.ext`` or ``<stem>.ext``)."""

    def __init__(self, folder: Path, recursive: bool = False) -> None:
        self.folder = folder
        self.files: dict[str, list[Path]] = {}
        if folder.is_dir():
            files = folder.rglob("*") if recursive else folder.iterdir()
            for p in sorted(files):
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _MASK_SUFFIXES:
                    self.files.setdefault(p.stem, []).append(p)

    def find(self, stem: str) -> Path | None:
        """The one mask of image ``stem``; DatasetError when two files could be it."""
        found = self.files.get(f"{stem}_mask", []) + self.files.get(stem, [])
        if len(found) > 1:
            raise DatasetError(
                f"{self.folder}: more than one mask for the image {stem!r}: {', '.join(str(p) for p in found)}"
            )
        return found[0] if found else None


# --------------------------------------------------------------------------------------
# generic folder layout
# --------------------------------------------------------------------------------------


def load_folder(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    """Load a generic ``train/`` + ``test/`` (+ ``masks/``) folder (see the module docstring)."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise DatasetError(f"{root}: no train/ folder (a generic dataset needs train/ with good images)")
    train, validation = split_validation(
        [Sample(p, 0) for p in list_images(root / "train", recursive=True)], val_fraction, seed
    )
    test: list[Sample] = []
    warnings: list[str] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        test = _folder_test_samples(root, test_dir, warnings)
    return DatasetSplit(f"folder:{root.resolve().name}", train, validation, test, warnings)


def _folder_test_samples(root: Path, test_dir: Path, warnings: list[str]) -> list[Sample]:
    loose = [p for p in test_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DatasetError(
            f"{test_dir}: holds images directly ({loose[0].name}, ...); put good test images in "
            f"test/good/ and defective ones in test/<defect>/ (e.g. test/scratch/)"
        )
    masks_dir = root / "masks"
    flat = _MaskIndex(masks_dir)
    test: list[Sample] = []
    users: dict[Path, list[Path]] = {}
    missing: list[Path] = []
    for defect_dir in _subfolders(test_dir):
        images = list_images(defect_dir, recursive=True)
        if defect_dir.name == GOOD:
            test.extend(Sample(p, 0) for p in images)
            continue
        per_defect = _MaskIndex(masks_dir / defect_dir.name, recursive=True)
        for image in images:
            mask = per_defect.find(image.stem) or flat.find(image.stem)
            if mask is None:
                missing.append(image)
            else:
                users.setdefault(mask, []).append(image)
            test.append(Sample(image, 1, mask, defect_dir.name))
    for mask, images in users.items():
        if len(images) > 1:
            raise DatasetError(
                f"{mask}: this mask matches several test images with the stem {images[0].stem!r} "
                f"({', '.join(str(p) for p in images)}); rename them or put the masks in "
                f"masks/<defect>/ folders"
            )
    if not test:
        raise DatasetError(f"{test_dir}: no test folders (expected test/good/ and test/<defect>/ folders)")
    if masks_dir.is_dir():
        if missing:
            warnings.append(_missing_masks_note(missing, f"in {masks_dir}"))
        indexes = [flat.files] + [_MaskIndex(d, recursive=True).files for d in _subfolders(masks_dir)]
        unused = sorted(p for files in indexes for paths in files.values() for p in paths if p not in users)
        if unused:
            shown = ", ".join(str(p) for p in unused[:5]) + (", ..." if len(unused) > 5 else "")
            warnings.append(f"{len(unused)} mask file(s) match no defective test image: {shown}")
    return test


# --------------------------------------------------------------------------------------
# ELPV
# --------------------------------------------------------------------------------------


def _elpv_data_dir() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the ELPV dataset is not installed: run `{pip_command('elpv-dataset')}`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_elpv(data_dir: str | Path | None = None, seed: int = 0, cell_type: str | None = None) -> DatasetSplit:
    """Load ELPV solar cells (see the module docstring for the split).

    Args:
        data_dir: folder holding ``labels.csv`` and ``images/``; ``None`` uses the installed
            ``elpv-dataset`` package.
        seed: seeds the split of the good cells.
        cell_type: ``"mono"``, ``"poly"`` or ``None`` for both.
    """
    if cell_type not in (None, "mono", "poly"):
        raise DatasetError(f"unknown ELPV cell type {cell_type!r}; use 'mono', 'poly' or leave it out for both")
    data_dir = _elpv_data_dir() if data_dir is None else Path(data_dir)
    rows = _read_elpv_labels(data_dir / "labels.csv")
    if cell_type is not None:
        rows = [r for r in rows if r[2] == cell_type]
    good = sorted(data_dir / p for p, prob, _ in rows if prob == 0.0)
    defective = sorted(data_dir / p for p, prob, _ in rows if prob == 1.0)
    absent = [p for p in good + defective if not p.is_file()]
    if absent:
        raise DatasetError(f"{data_dir}: {len(absent)} image(s) listed in labels.csv are missing, e.g. {absent[0]}")
    if len(good) < 3:
        raise DatasetError(f"{data_dir}: too few good cells ({len(good)}) to split into train/validation/test")
    order = np.random.default_rng(seed).permutation(len(good))
    n_train = math.floor(ELPV_FRACTIONS[0] * len(good) + 0.5)
    n_val = math.floor(ELPV_FRACTIONS[1] * len(good) + 0.5)
    pick = lambda idx: sorted(good[i] for i in idx)  # noqa: E731
    train = [Sample(p, 0) for p in pick(order[:n_train])]
    validation = [Sample(p, 0) for p in pick(order[n_train : n_train + n_val])]
    test = [Sample(p, 0) for p in pick(order[n_train + n_val :])] + [Sample(p, 1, None, "defective") for p in defective]
    name = "elpv" if cell_type is None else f"elpv:{cell_type}"
    return DatasetSplit(name, train, validation, test, ["ELPV has no defect masks: only image-level metrics"])


def elpv_cell_types(data_dir: str | Path | None = None) -> dict[Path, str]:
    """The cell type (``"mono"`` or ``"poly"``) of every ELPV image, by its path (as :func:`load_elpv` gives it)."""
    data_dir = _elpv_data_dir() if data_dir is None else Path(data_dir)
    return {data_dir / p: kind for p, _, kind in _read_elpv_labels(data_dir / "labels.csv")}


def _read_elpv_labels(labels: Path) -> list[tuple[str, float, str]]:
    if not labels.is_file():
        raise DatasetError(f"{labels}: ELPV labels file not found (reinstall with `{pip_command('elpv-dataset')}`)")
    rows = []
    for number, line in enumerate(labels.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            path, prob, kind = fields
            rows.append((path, float(prob), kind))
        except ValueError:
            raise DatasetError(
                f"{labels}, line {number}: expected 'images/<file> <probability> <type>', got {line!r}"
            ) from None
    return rows


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    sample: Sample
    image: torch.Tensor  # [3,H,W] (already resized when a size is given)
    original_hw: tuple[int, int]
    mask: torch.Tensor | None  # [H,W] bool at the original size


def iter_batches(
    samples: Sequence[Sample],
    batch_size: int,
    size: int | tuple[int, int] | None = None,
    with_masks: bool = False,
    num_workers: int = 0,
    progress: str | None = None,
) -> Iterator[Batch]:
    """Read ``samples`` in order and yield them in batches of up to ``batch_size`` images.

    Args:
        samples: the images to read.
        batch_size: most images per batch.
        size: ``(H, W)`` (or one side for squares) every image is resized to; ``None`` keeps
            each image's resolution and starts a new batch wherever the size changes.
        with_masks: also read the masks (``read_mask`` with the image's size, so a mask of
            the wrong size is an error); images without a mask file get an all-False mask.
            Masks keep the original resolution, so with ``size`` given a batch also ends
            where the original size changes.
        num_workers: decode this many images in parallel (threads); 0 reads in this thread.
        progress: a description to show a tqdm progress bar on stderr; ``None`` for none.

    Raises:
        ImageReadError: an image or mask cannot be read.
        ConfigError: a bad ``batch_size``, ``size`` or ``num_workers``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
    target = _size_pair(size)
    bar = _progress_bar(progress, len(samples))
    pending: list[_Loaded] = []
    try:
        for item in _load_all(samples, target, with_masks, num_workers):
            if pending and _batch_key(item, with_masks) != _batch_key(pending[0], with_masks):
                yield _make_batch(pending, with_masks)
                pending = []
            pending.append(item)
            if bar is not None:
                bar.update(1)
            if len(pending) == batch_size:
                yield _make_batch(pending, with_masks)
                pending = []
        if pending:
            yield _make_batch(pending, with_masks)
    finally:
        if bar is not None:
            bar.close()


def _size_pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair: tuple[int, ...] = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and v > 0 for v in pair):
        raise ConfigError(f"size must be a positive int or (height, width), got {size!r}")
    return (int(pair[0]), int(pair[1]))


def _progress_bar(description: str | None, total: int):  # noqa: ANN202 - tqdm or None
    if description is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, mininterval=1.0)


def _batch_key(item: _Loaded, with_masks: bool) -> tuple:
    shape = tuple(item.image.shape)
    return (shape, item.original_hw) if with_masks else (shape,)


def _make_batch(items: list[_Loaded], with_masks: bool) -> Batch:
    images = torch.stack([it.image for it in items]).contiguous()
    masks = torch.stack([it.mask for it in items if it.mask is not None]) if with_masks else None
    return Batch(images, [it.sample for it in items], masks, [it.original_hw for it in items])


def _load_one(sample: Sample, target: tuple[int, int] | None, with_masks: bool) -> _Loaded:
    array = read_image(sample.path)
    hw = (int(array.shape[0]), int(array.shape[1]))
    image = to_tensor(array)
    if target is not None and hw != target:
        from anomnet.transforms import resize

        image = resize(image[None], target)[0].contiguous()
    mask = None
    if with_masks:
        if sample.mask_path is not None:
            mask = torch.from_numpy(read_mask(sample.mask_path, expected_hw=hw))
        else:
            mask = torch.zeros(hw, dtype=torch.bool)
    return _Loaded(sample, image, hw, mask)


def _load_all(
    samples: Sequence[Sample], target: tuple[int, int] | None, with_masks: bool, num_workers: int
) -> Iterator[_Loaded]:
    """Load samples in order; with workers, a bounded number of reads run ahead in threads."""
    if num_workers == 0:
        for sample in samples:
            yield _load_one(sample, target, with_masks)
        return
    window = 2 * num_workers
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="anomnet-read") as pool:
        queue: deque[Future[_Loaded]] = deque()
        try:
            for sample in samples:
                queue.append(pool.submit(_load_one, sample, target, with_masks))
                if len(queue) >= window:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            for future in queue:
                future.cancel()


__all__ = [
    "Batch",
    "DatasetSplit",
    "LAYOUTS",
    "Sample",
    "UNLABELLED_SPLITS",
    "iter_batches",
    "load_dataset",
    "elpv_cell_types",
    "load_elpv",
    "load_folder",
    "load_mvtec",
    "split_validation",
]
