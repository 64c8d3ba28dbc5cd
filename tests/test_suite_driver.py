"""The suite driver (benchmarks/suite.py): variant rows limited to some datasets, and the table naming them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import suite  # noqa: E402


def test_a_variant_can_be_limited_to_some_datasets(capsys, tmp_path: Path) -> None:
    args = ["--dry-run", "--models", "patchcore", "--datasets", "bottle,piped", "--runs", str(tmp_path)]
    args += ["--variant", "effad-800:model=efficientad;steps=800;datasets=bottle,PA_BRG03_TL"]
    assert suite.main(args) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert [d for d, name in rows if name == "effad-800"] == ["bottle", "PA_BRG03_TL"]
    assert [d for d, name in rows if name == "patchcore"] == ["bottle", *suite.PIPED_CLASSES]
    assert "datasets" not in str(rows)  # the key chooses rows, it is no detector setting


def test_the_table_names_each_variant_row_and_its_settings() -> None:
    metrics = {"image_auroc": 1.0}
    row = {"group": "bottle", "fit_s": 1.0, "metrics": metrics, "dataset": "bottle"}
    report = {
        "command": "python benchmarks/suite.py",
        "cpu": "cpu",
        "cpu_cores": 2,
        "torch": "2",
        "started": "now",
        "seconds": 60.0,
        "load_min": 0.0,
        "load_max": 0.1,
        "complete": True,
        "rows": [
            {**row, "model": "efficientad", "detector": "efficientad", "settings": {"steps": "100"}},
            {**row, "model": "effad-800", "detector": "efficientad", "settings": {"steps": "800", "cache_dir": "/c"}},
        ],
    }
    text = suite.render(report)
    assert "Variant rows: effad-800: efficientad with steps=800, on bottle." in text
    assert "| bottle | effad-800 |" in text and "INCOMPLETE" not in text
