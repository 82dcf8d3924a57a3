"""The README's usage example runs as written (under torchrun on 2 CPU ranks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text.split("## Usage", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Usage section has no python block"
    script = tmp_path / "usage.py"
    script.write_text(match.group(1))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("hits="))
    # The two replays of the loop are hits, below dispatch or (no argument requires grad) above it.
    fields = dict(field.split("=", 1) for field in line.split()[:3])
    assert int(fields["hits"]) + int(fields["above"]) >= 2, line
