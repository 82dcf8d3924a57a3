"""The design is inside the project: every ARCHITECTURE section that code, tests or docs cite by
name exists, and nothing cites a design document outside the repository."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The word ARCHITECTURE, then one or more section names in single or double quotes, comma-separated.
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


def _api_table() -> dict[str, str]:
    """The README's API table: {name: signature cell}, from the rows of the first table under
    '## API'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        match = re.match(r"^\| `(\w+)` \| `([^`]+)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def _parameters(func: object) -> str:
    """``a, *, b=1``: a function's parameters as the API table writes them (no annotations)."""
    words: list[str] = []
    star = False
    for param in inspect.signature(func).parameters.values():  # type: ignore[arg-type]
        if param.kind is param.KEYWORD_ONLY and not star:
            words.append("*")
            star = True
        elif param.kind is param.VAR_POSITIONAL:
            star = True
            words.append(f"*{param.name}")
            continue
        elif param.kind is param.VAR_KEYWORD:
            words.append(f"**{param.name}")
            continue
        default = "" if param.default is param.empty else f"={param.default!r}"
        words.append(param.name + default)
    return ", ".join(words)


def test_api_table_lists_all_of_the_public_api() -> None:
    import dtdispatch

    rows = _api_table()
    assert not set(dtdispatch.__all__) - set(rows), "missing from README's API table"
    assert not set(rows) - set(dtdispatch.__all__), "README's API table lists non-public names"
    for name in dtdispatch.__all__:
        obj = getattr(dtdispatch, name)
        if inspect.isfunction(obj):
            signature = rows[name].split(" -> ")[0]
            assert signature == f"{name}({_parameters(obj)})", (name, rows[name])
        else:
            assert rows[name].split("(")[0].removeprefix("class ") == name, (name, rows[name])
