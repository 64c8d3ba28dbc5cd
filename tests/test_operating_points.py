"""Operating points in words: the table fit, calibrate --dry-run, the demo and the report print."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomnet.cli import EXIT_OK, demo_operating_points, main
from anomnet.decisions.calibration import ThresholdOptions, calibrate
from anomnet.decisions.operating_points import calibrate_command, changes, format_table, operating_points, suggest

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]
VALIDATION = np.arange(1.0, 100.0)  # 99 good calibration scores 1..99: the finest rate is 1 %


def test_each_asked_rate_gets_the_conformal_threshold_and_its_supported_rate() -> None:
    cal = calibrate(VALIDATION, 0.05)
    points = operating_points(cal)
    assert [p.asked for p in points] == [0.01, 0.02, 0.05, 0.1]
    # the conformal rule: k = floor(rate * 100) - 1 scores lie above the threshold, supported rate (k + 1) / 100
    assert [p.supported for p in points] == pytest.approx([0.01, 0.02, 0.05, 0.1])
    assert [p.threshold for p in points] == pytest.approx([99.0, 98.0, 95.0, 90.0])
    assert [p.current for p in points] == [False, False, True, False]
    lines = format_table(points, cal)
    assert "finest 1/100 = 1 %" in lines[0] and "supported by 99 good calibration images" in lines[1]
    assert lines[4].startswith("5 % (model)") and "95" in lines[4]


def test_the_models_own_threshold_is_a_row_when_another_method_chose_it() -> None:
    cal = calibrate(VALIDATION, options=ThresholdOptions(image_method="fixed", image_value=96.5))
    points = operating_points(cal)
    own = [p for p in points if p.current]
    assert len(own) == 1 and own[0].asked is None and own[0].threshold == 96.5 and own[0].supported == 0.04
    assert [p.threshold for p in points] == sorted((p.threshold for p in points), reverse=True)
    assert any(line.startswith("- (fixed) (model)") for line in format_table(points, cal))
    # the command that sets a rate on such a model switches it back to the conformal rule
    rate = next(p for p in points if p.asked == 0.05)
    assert calibrate_command("runs/my model", rate, cal) == (
        "anomnet calibrate --model-dir 'runs/my model' --image-threshold conformal --max-false-alarm 0.05"
    )


def test_counts_on_a_labelled_set_and_the_balanced_suggestion() -> None:
    cal = calibrate(VALIDATION, 0.01)
    scores = np.array([50.0, 91.0, 96.0, 99.5] + [92.0, 96.0, 98.5, 99.5, 120.0])
    labels = np.array([0, 0, 0, 0] + [1, 1, 1, 1, 1])
    points = operating_points(cal, scores, labels)
    by_rate = {p.asked: p for p in points}
    assert (by_rate[0.01].false_alarms, by_rate[0.01].caught) == (1, 2)  # threshold 99
    assert (by_rate[0.05].false_alarms, by_rate[0.05].caught) == (2, 4)  # threshold 95
    assert (by_rate[0.1].false_alarms, by_rate[0.1].caught) == (3, 5)  # threshold 90
    assert by_rate[0.05].recall == 0.8 and by_rate[0.05].false_alarm_rate == 0.5
    # no rate held on this set (25 % false alarms at 1 % asked and more): the best recall - false-alarm rate,
    # 0.15, 0.35, 0.3, 0.25 at 1, 2, 5, 10 %
    best = suggest(points)
    assert best is not None and best.asked == 0.02
    table = format_table(points, cal, "test")
    assert "test false alarms" in table[1] and "1 of 4 (25 %)" in table[2] and "2 of 5 (40 %)" in table[2]
    assert suggest(operating_points(cal)) is None  # no labels, no suggestion


def test_the_suggestion_catches_the_most_among_the_rates_that_held() -> None:
    cal = calibrate(VALIDATION, 0.01)
    good = np.concatenate([np.full(96, 50.0), [91.0, 91.0, 96.0, 96.0]])  # 100 good: 2 % at 95, 4 % at 90
    scores = np.concatenate([good, [93.0, 96.0, 99.5, 120.0]])
    labels = np.array([0] * 100 + [1] * 4)
    by_rate = {p.asked: p for p in operating_points(cal, scores, labels)}
    assert [by_rate[r].false_alarm_rate for r in (0.01, 0.02, 0.05, 0.1)] == [0.0, 0.0, 0.02, 0.04]
    assert [by_rate[r].recall for r in (0.01, 0.02, 0.05, 0.1)] == [0.5, 0.5, 0.75, 1.0]
    best = suggest(list(by_rate.values()))  # every rate held: the most recall, 10 %
    assert best is not None and best.asked == 0.1
    worse = scores.copy()
    worse[:12] = 91.0  # 16 good images at or above 90: 10 % no longer holds, 5 % (2 of 100) does
    assert suggest(operating_points(cal, worse, labels)).asked == 0.05  # type: ignore[union-attr]


def test_the_demo_ends_with_its_test_operating_points_and_the_command() -> None:
    cal = calibrate(VALIDATION, 0.01)
    scores = np.array([50.0, 91.0, 96.0, 99.5, 92.0, 96.0, 98.5, 99.5, 120.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    lines = demo_operating_points(cal, scores, labels, Path("runs/demo/model"))
    assert "on the test images" in lines[0]
    assert lines[-1] == "  anomnet calibrate --model-dir runs/demo/model --max-false-alarm 0.02"
    assert lines[-2].startswith("asked 2 % is the best balance")
    held = np.array([50.0] * 4 + [92.0, 96.0, 98.5, 99.5, 120.0])  # no false alarm at any rate: 10 % catches all
    lines = demo_operating_points(cal, held, labels, Path("runs/demo/model"))
    assert lines[-2].startswith("asked 10 % catches the most defective cells among the rates whose false-alarm")
    assert lines[-1].endswith("--max-false-alarm 0.1")


def test_changes_name_what_a_recalibration_changes() -> None:
    before = calibrate(VALIDATION, 0.01)
    assert changes(before, before) == []
    after = before.rethreshold(ThresholdOptions(max_false_alarm=0.1))
    (line,) = changes(before, after)
    assert line.startswith("image threshold 99 (conformal") and "-> 90 (conformal, 10 %)" in line


def test_fit_and_calibrate_dry_run_print_the_table_and_dry_run_saves_nothing(
    folder_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(model), *SMALL]) == EXIT_OK
    out = capsys.readouterr().out
    assert "operating points:" in out and "1 % (model)" in out and "10 %" in out
    assert "it only draws the defect mask of an image the image threshold calls defective" in out
    assert f"anomnet calibrate --model-dir {model} --max-false-alarm RATE" in out
    saved = (model / "anomnet.json").read_text()
    threshold = json.loads(saved)["calibration"]["threshold"]
    args = ["calibrate", "--model-dir", str(model), "--image-threshold", "fixed", "--image-value", "1234.5"]
    assert main([*args, "--dry-run", "--quiet"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"would change:\n  image threshold {threshold:.6g} (conformal" in out and "-> 1234.5 (fixed" in out
    assert "- (fixed) (model)" in out and "not saved (--dry-run)" in out
    assert (model / "anomnet.json").read_text() == saved
    assert main([*args, "--quiet"]) == EXIT_OK
    assert "changed:\n  image threshold" in capsys.readouterr().out
    assert json.loads((model / "anomnet.json").read_text())["calibration"]["threshold"] == 1234.5
