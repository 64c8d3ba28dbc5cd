"""benchmarks/cpr_tiled_banks.py: the settings of the fit the variants re-score, and how its row is named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpr_tiled_banks.py"


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpr_tiled_banks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(today_settings: dict[str, str] | None) -> dict[str, object]:
    phases = {"bank": {"extra": {"kept": 600}}, "features": {"extra": {"inputs": 1692}}}
    today = {"bank_mb": 750.0, "fit_phases": phases, "metrics": {"au_pro@0.05": 0.77}, "ratio_b1": 9.5}
    report: dict[str, object] = {"today": today}
    if today_settings is not None:
        report["today_settings"] = today_settings
    return report


def test_settings_are_the_tiles_plus_the_given_json_as_text() -> None:
    d = _driver()
    assert d._settings(json.dumps({"tile_overlap": 0.2, "windows": [3, 1]})) == {
        "tile": "512",
        "tile_overlap": "0.2",
        "windows": "3,1",
    }


def test_the_base_fit_row_is_named_by_its_settings() -> None:
    d = _driver()
    assert "| today (every tile) | 600 |" in d.render(_report(None))  # reports from before the option
    assert "| today (every tile) | 600 |" in d.render(_report(d.TODAY))
    text = d.render(_report(d._settings('{"tile_overlap": 0.2}')))
    assert "| tile_overlap=0.2 (fit) | 600 | 750 |" in text and "77.00" in text and "9.5x" in text
    assert "| defaults (fit) |" in d.render(_report(dict(d.TILED)))
