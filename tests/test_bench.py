"""The benchmark's Markdown sections: one command's table never overwrites another's."""

from __future__ import annotations

from pathlib import Path

from anomnet.bench import write_section


def test_sections_replace_only_their_own_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "a", "table A v1\n")
    write_section(path, "b", "table B\n")
    write_section(path, "a", "table A v2\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "table A v2" in text and "table A v1" not in text
    assert "table B" in text
    assert text.index("table A v2") < text.index("table B")  # a replaced section keeps its place
    assert text.count("<!-- bench:a -->") == 1 and text.count("<!-- /bench:a -->") == 1


def test_without_section_the_whole_file_is_written(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    path.write_text("old\n")
    write_section(path, None, "new\n")
    assert path.read_text() == "# Benchmarks\n\nnew\n"
