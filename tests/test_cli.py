"""The command-line tool as a user runs it: exit codes, outputs, messages."""

from __future__ import annotations

import json

import pytest

from anomnet.cli import EXIT_INPUT, EXIT_OK, EXIT_SOME_FAILED, main

SMALL = ["--image-size", "64", "--set", "batch_size=4", "--quiet"]


@pytest.fixture
def model_dir(folder_dataset, tmp_path):
    out = tmp_path / "model"
    assert main(["fit", "--data", str(folder_dataset), "--out", str(out), *SMALL]) == EXIT_OK
    return out


def test_fit_test_predict(folder_dataset, model_dir, tmp_path, capsys) -> None:
    assert (model_dir / "anomnet.json").is_file() and (model_dir / "weights.safetensors").is_file()
    assert (
        main(
            [
                "test",
                "--model-dir",
                str(model_dir),
                "--data",
                str(folder_dataset),
                "--quiet",
                "--heatmaps",
                str(tmp_path / "h"),
            ]
        )
        == EXIT_OK
    )
    out = capsys.readouterr().out
    for key in (
        "image_auroc",
        "pixel_auroc",
        "au_pro@0.3",
        "au_pro@0.05",
        "pixel_f1_max",
        "image_f1_max",
        "precision",
        "recall",
        "f1",
    ):
        assert key in out
    metrics = json.loads((model_dir / "metrics.json").read_text())["metrics"]
    assert metrics["image_auroc"] == 1.0
    assert len(list((tmp_path / "h").glob("*.png"))) == 6

    csv_path = tmp_path / "r.csv"
    assert (
        main(["predict", "--model-dir", str(model_dir), str(folder_dataset / "test"), "--csv", str(csv_path)])
        == EXIT_OK
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 8
    assert sum("DEFECTIVE" in line for line in lines if "/blob/" in line) == 4
    assert csv_path.read_text().count("\n") == 9


def test_predict_goes_on_past_a_corrupt_file(model_dir, folder_dataset, tmp_path, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = next((folder_dataset / "test" / "good").glob("*.png"))
    assert main(["predict", "--model-dir", str(model_dir), str(good), str(bad)]) == EXIT_SOME_FAILED
    captured = capsys.readouterr()
    assert "broken.png" in captured.out and "error" in captured.out
    assert str(good) in captured.out
    assert "1 of 2 images could not be read" in captured.err


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys, model_dir) -> None:
    assert main(["fit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_INPUT
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert main(["fit", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == EXIT_INPUT
    assert "error" in capsys.readouterr().err
    assert main(["test", "--model-dir", str(tmp_path / "nomodel"), "--data", str(tmp_path)]) == EXIT_INPUT
    assert "no such model folder" in capsys.readouterr().err
    assert main(["fit", "--data", "x", "--out", "y", "--set", "novalue"]) == EXIT_INPUT
    assert main(["fit", "--data", "elpv", "--out", "y", "--set", "coreset_ratio=abc"]) == EXIT_INPUT
    assert "coreset_ratio" in capsys.readouterr().err
    # a model folder from another format version
    meta = json.loads((model_dir / "anomnet.json").read_text())
    meta["format_version"] = 0
    (model_dir / "anomnet.json").write_text(json.dumps(meta))
    assert main(["predict", "--model-dir", str(model_dir), "x.png"]) == EXIT_INPUT
    assert "format version 0" in capsys.readouterr().err


def test_models_lists_detectors_and_backbones(capsys) -> None:
    assert main(["models", "--settings"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "patchcore" in out and "efficientnet_lite0" in out and "wide_resnet50_2" in out and "coreset_ratio" in out
    # each backbone line names the detectors it is the default of (PatchCore's is Lite1, the others' Lite0)
    marks = {line.split()[0]: line.partition("[default of ")[2] for line in out.splitlines() if "[default of" in line}
    assert "patchcore" in marks["efficientnet_lite1"] and "tocoad" in marks["efficientnet_lite1"]
    assert "cpr" in marks["efficientnet_lite0"] and "patchcore" not in marks["efficientnet_lite0"]


def test_help_explains_every_option(capsys) -> None:
    import argparse

    from anomnet.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == list(COMMANDS)  # each command: its parser and its run, in the help's order
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"anomnet {name} {action.option_strings or action.dest} has no help text"
    for cmd in ("fit", "test", "predict", "models", "demo", "bench"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage" in out


@pytest.mark.slow
def test_bottle_metrics_json(bottle, tmp_path, capsys) -> None:
    """`anomnet test` on the shared bottle data prints and writes every metric (few training images: fast)."""
    out = tmp_path / "m"
    assert (
        main(
            [
                "fit",
                "--data",
                str(bottle),
                "--out",
                str(out),
                "--max-train",
                "10",
                "--quiet",
                "--set",
                "coreset_ratio=0.02",
            ]
        )
        == EXIT_OK
    )
    assert (
        main(["test", "--model-dir", str(out), "--data", str(bottle), "--quiet", "--json", str(tmp_path / "m.json")])
        == EXIT_OK
    )
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(metrics) >= {
        "image_auroc",
        "pixel_auroc",
        "au_pro@0.3",
        "au_pro@0.05",
        "pixel_f1_max",
        "image_f1_max",
        "f1",
    }
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9


def test_demo_summary_says_found_and_flagged_in_counts() -> None:
    from types import SimpleNamespace

    from anomnet.cli import in_words

    test = [SimpleNamespace(label=1)] * 40 + [SimpleNamespace(label=0)] * 60
    text = in_words({"recall": 0.25, "false_alarm_rate": 0.05, "image_auroc": 0.9}, test)
    assert "caught 10 of 40 defective cells (25.0 %)" in text
    assert "wrongly flagged 3 of 60 good cells (5.0 %)" in text
    assert "no threshold summary" in in_words({"recall": float("nan"), "false_alarm_rate": 0.0}, test)
