"""Golden tests: CPR and INP-Former give the recorded image scores on a fixed bottle subset.

Recorded with the code before their scoring moved to :mod:`anomnet.components.score_reduction`
and their state into one module (relative tolerance 1e-4). INP-Former's image score is the mean
of the top 1 % of a 64 x 64 map: 40 pixels (40.96 rounded down), so the values pin the rounding.
INP-Former trains in float32 here (``bf16=False``: bfloat16 rounds differently on CPUs with and
without AVX512-BF16 / AMX). Rerun with ``ANOMNET_GOLDEN_PRINT=1`` and ``-s`` to print the current values.
"""

from __future__ import annotations

import os

import pytest
from tests.test_golden import golden_scores

SIZE = {"image_size": 64, "crop": 64, "batch_size": 4, "seed": 0}
SETTINGS = {
    "cpr": {**SIZE, "train_batch_size": 2, "steps": 3, "train_crop": 32, "points": 20},
    "inpformer": {**SIZE, "steps": 4, "train_batch_size": 4, "decoder_depth": 4, "bf16": False},
}
GOLDEN: dict[str, list[float]] = {
    # 12 image scores, then the maps' mean and maximum
    "cpr": [
        0.4464171826839447,
        0.5245181918144226,
        0.6193069815635681,
        0.6408095359802246,
        0.5388432145118713,
        0.5407586097717285,
        0.08045914769172668,
        0.15733417868614197,
        0.1027643084526062,
        0.14645394682884216,
        0.19191710650920868,
        0.10017964988946915,
        0.08181027323007584,
        0.6408095359802246,
    ],
    "inpformer": [
        1.9141664505004883,
        1.8995506763458252,
        1.9952300786972046,
        2.004673480987549,
        1.797551155090332,
        1.8383948802947998,
        1.8064701557159424,
        1.8638277053833008,
        1.823614478111267,
        1.8710041046142578,
        1.8424835205078125,
        1.796085000038147,
        1.54486882686615,
        2.016777276992798,
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_image_scores_are_unchanged(bottle, name) -> None:
    got = golden_scores(bottle, name, SETTINGS[name])
    if os.environ.get("ANOMNET_GOLDEN_PRINT"):
        print(name, got)
    assert got == pytest.approx(GOLDEN[name], rel=1e-4)
