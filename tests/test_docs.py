"""The design is inside the project: every ARCHITECTURE section that code, tests or docs cite by
name exists, and nothing cites a design document outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ARCHITECTURE "Name" or ARCHITECTURE 'Name', possibly several: ARCHITECTURE "A", "B".
CITATION = re.compile(r"""ARCHITECTURE(?:\.md)? ((?:(["'])[^"'\n]{1,60}\2(?:, )?)+)""")
QUOTED = re.compile(r"""(["'])([^"'\n]{1,60})\1""")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    suffixes = {".py", ".c", ".h", ".pyi", ".md", ".toml", ".cfg", ".txt"}
    return [ROOT / n for n in names if Path(n).suffix in suffixes or Path(n).name == "Makefile"]


def _sections() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    return {m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", text, flags=re.M)}


def test_every_cited_section_exists() -> None:
    sections = _sections()
    cited: dict[str, list[str]] = {}
    for path in _tracked_text_files():
        # Citations may wrap across a line break inside a quoted name.
        text = re.sub(r"\s*\n\s*(?:#|\*|//)?\s*", " ", path.read_text(errors="replace"))
        for match in CITATION.finditer(text):
            for _, name in QUOTED.findall(match.group(1)):
                cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert cited, "no ARCHITECTURE citation found: the pattern no longer matches the code"
    missing = {name: files for name, files in cited.items() if name not in sections}
    assert not missing, f"cited ARCHITECTURE sections that do not exist: {missing}"


def test_nothing_cites_documents_outside_the_project() -> None:
    outside = re.compile(r"DESIGN §|DESIGN\.md|\.\./shared|shared/DESIGN|seeds/")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _tracked_text_files()
        if path.name != "test_docs.py"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not offenders, offenders
