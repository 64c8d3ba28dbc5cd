"""Golden tests: PatchCore and AnomNet give the recorded image scores on a fixed bottle subset.

The values were recorded with the code before the detectors became packages; they pin the
behaviour across refactors (relative tolerance 1e-4). Rerun with ``ANOMNET_GOLDEN_PRINT=1`` and
``-s`` to print the current values.
"""

from __future__ import annotations

import os

import pytest

from anomnet.data import iter_batches, load_dataset
from anomnet.detectors import create_detector

SIZE = {"image_size": 64, "crop": 64, "batch_size": 4, "seed": 0}
SETTINGS = {
    "patchcore": SIZE,
    "anomnet": {**SIZE, "epochs1": 2, "epochs2": 2},
}
GOLDEN: dict[str, list[float]] = {
    # 12 image scores, then the maps' mean and maximum
    "patchcore": [
        34.99888229370117,
        34.28139114379883,
        35.95759963989258,
        49.53398132324219,
        28.254093170166016,
        28.9290714263916,
        12.812776565551758,
        15.352226257324219,
        13.456348419189453,
        13.692481994628906,
        15.933287620544434,
        15.596685409545898,
        16.393901824951172,
        48.858062744140625,
    ],
    "anomnet": [
        3.601132869720459,
        3.2847964763641357,
        3.6390039920806885,
        5.567917823791504,
        3.020477294921875,
        2.699216604232788,
        0.5861300826072693,
        0.9435915946960449,
        0.7093219757080078,
        0.5662286281585693,
        1.1578540802001953,
        0.8531761169433594,
        1.1835647821426392,
        5.567917823791504,
    ],
}


def golden_scores(bottle, name: str, settings: dict) -> list[float]:
    """12 image scores (6 broken, 6 good), then the maps' mean and maximum, after a fit on 20 images."""
    split = load_dataset(bottle)
    test = split.test[:6] + split.test[-6:]  # some broken, some good
    det = create_detector(name, settings)
    det.fit(split.train[:20], split.validation[:4], progress=False)
    batch = next(iter(iter_batches(test, len(test), size=64)))
    pred = det.predict(batch.images)
    return [float(v) for v in pred.scores] + [float(pred.maps.mean()), float(pred.maps.amax())]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_image_scores_are_unchanged(bottle, name) -> None:
    got = golden_scores(bottle, name, SETTINGS[name])
    if os.environ.get("ANOMNET_GOLDEN_PRINT"):
        print(name, got)
    assert got == pytest.approx(GOLDEN[name], rel=1e-4)
