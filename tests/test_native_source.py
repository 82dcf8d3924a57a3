"""The native C sources stay readable beside their Python twins: no line of a C file or header in
the package is wider than the 100 columns the Python code keeps."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 100


def _c_sources() -> list[Path]:
    package = ROOT / "dtdispatch"
    return sorted([*package.rglob("*.c"), *package.rglob("*.h")])


def _wide_lines(path: Path, root: Path) -> list[str]:
    """``file:line (N columns)`` for each line of ``path`` wider than WIDTH."""
    return [
        f"{path.relative_to(root)}:{number} ({len(line)} columns)"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if len(line) > WIDTH
    ]


def test_the_c_sources_are_found() -> None:
    # Both extensions' sources and the shared header: the width check below reads them all.
    sources = _c_sources()
    assert sum(p.suffix == ".c" for p in sources) >= 2, sources
    assert any(p.suffix == ".h" for p in sources), sources


def test_no_c_line_is_wider_than_100_columns() -> None:
    wide = [entry for path in _c_sources() for entry in _wide_lines(path, ROOT)]
    assert not wide, f"C lines over {WIDTH} columns: {wide}"


def test_a_wide_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "x.c"
    source.write_text("int a;\n" + "/*" + "x" * 97 + "*/\n" + "/*" + "x" * 96 + "*/\n")
    assert _wide_lines(source, tmp_path) == ["x.c:2 (101 columns)"]
