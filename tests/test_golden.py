"""Golden tests: PatchCore and AnomNet give the recorded image scores on a fixed bottle subset.

The values were recorded after the border fix (zero padding counted in the patch average), PatchCore's
with its default backbone EfficientNet-Lite1; they pin the behaviour across refactors (relative
tolerance 1e-4). Rerun with ``ANOMNET_GOLDEN_PRINT=1`` and ``-s`` to print the current values.
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
        33.9013786315918,
        31.62649917602539,
        39.24881362915039,
        48.42634201049805,
        31.573028564453125,
        29.470300674438477,
        12.005070686340332,
        17.085407257080078,
        13.237832069396973,
        11.76982593536377,
        16.68183708190918,
        13.94771957397461,
        14.05926513671875,
        43.01146697998047,
    ],
    "anomnet": [
        2.7650551795959473,
        2.7569751739501953,
        3.012701988220215,
        3.9516677856445312,
        2.559302806854248,
        2.2804291248321533,
        0.6022913455963135,
        0.8356007933616638,
        0.6508733034133911,
        0.674053966999054,
        1.0666286945343018,
        0.7165200710296631,
        0.901544988155365,
        3.9516677856445312,
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
