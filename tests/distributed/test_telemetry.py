"""DTDISPATCH_TELEMETRY under a real torchrun job (2 ranks): one file per rank, written at exit with
that rank's stats, and ``python -m dtdispatch.telemetry`` merging them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.test_launch import _run

JOB = str(Path(__file__).with_name("_telemetry_job.py"))


def _summed(own: list[dict[str, Any]], field: str) -> int:
    return sum(int(s[field]) for s in own)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the job once for the module: its telemetry DIR, each rank's own stats, the merge."""
    root = tmp_path_factory.mktemp("telemetry")
    tel, own_dir = root / "tel", root / "own"
    own_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", JOB]
    launched = _run(cmd, DTDISPATCH_TELEMETRY=str(tel), OWN_DIR=str(own_dir))
    assert launched.returncode == 0, launched.stdout
    # NOTE: DTDISPATCH_TELEMETRY stays exported for the merge, as it would in a user's shell: the
    # merge process must not add a record of its own.
    merged = subprocess.run(
        [sys.executable, "-m", "dtdispatch.telemetry", str(tel), "--top", "0"],
        env={**os.environ, "DTDISPATCH_TELEMETRY": str(tel)}, text=True, capture_output=True,
        timeout=120,
    )
    own = [json.loads((own_dir / f"own-rank{r}.json").read_text()) for r in range(2)]
    return {"tel": tel, "own": own, "merged": merged}


def test_one_file_per_rank_with_its_own_stats(job: dict[str, Any]) -> None:
    files = sorted(job["tel"].iterdir())
    names = [f.name for f in files]
    assert len(files) == 2, names  # the merge run added nothing
    for rank, path in enumerate(files):
        assert re.fullmatch(rf"dtdispatch-rank{rank}-of-2-pid\d+\.json", path.name), path.name
        data = json.loads(path.read_text())
        assert data["rank"] == rank and data["world_size"] == 2
        assert path.name.endswith(f"-pid{data['pid']}.json") and data["pid"] != os.getpid()
        assert data["torch_version"] == torch.__version__
        own = job["own"][rank]
        assert data["implementation"] == own["implementation"] in ("native", "python")
        assert data["stats"] == own  # nothing ran between the job's snapshot and exit
    # rank 0 destroyed its process group before exit, rank 1 did not.
    sources = [json.loads(p.read_text())["rank_source"] for p in files]
    assert sources == ["process group seen by accelerate", "process group at exit"]
    # the job's work differs per rank, so the per-rank numbers are not interchangeable
    # (x + 1.0 needs no autograd: its hits are the path above dispatch's)
    assert job["own"][0]["above"]["hits"] != job["own"][1]["above"]["hits"]


def test_merge_totals_ops_and_ranks(job: dict[str, Any]) -> None:
    merged, own = job["merged"], job["own"]
    assert merged.returncode == 0, merged.stderr
    out = merged.stdout
    assert "dtdispatch telemetry: 2 file(s), ranks [0, 1] of world size 2" in out
    hits, misses = _summed(own, "hits"), _summed(own, "misses")
    bailouts = sum(sum(s["bailouts"].values()) for s in own)
    entries, evictions = _summed(own, "entries"), _summed(own, "evictions")
    assert (
        f"totals: hits={hits} misses={misses} bailouts={bailouts} entries={entries} "
        f"evictions={evictions} hit rate={100 * hits / (hits + misses):.1f}%"
    ) in out
    # The per-op table: every op of either rank, summed, most misses first.
    table = out.split("most misses first):\n")[1].split("\n\n")[0].splitlines()[1:]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:4]] for line in table}
    ops = set(own[0]["per_op"]) | set(own[1]["per_op"])
    assert set(rows) == ops
    for op in ops:
        want = [sum(s["per_op"].get(op, {}).get(f, 0) for s in own)
                for f in ("hits", "misses", "bailouts")]
        assert rows[op] == want, op
        reasons: dict[str, int] = {}
        for s in own:
            for reason, n in s["bailouts_per_op"].get(op, {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        line = next(row for row in table if row.split()[0] == op)
        for reason, n in reasons.items():
            assert f"{reason}: {n}" in line, line
    misses_in_order = [rows[line.split()[0]][1] for line in table]
    assert misses_in_order == sorted(misses_in_order, reverse=True)
    assert misses_in_order[0] > 0
    for rank, s in enumerate(own):
        assert (
            f"rank {rank}/2 pid " in out
            and f"hits={s['hits']} misses={s['misses']} bailouts={sum(s['bailouts'].values())} "
            f"entries={s['entries']} evictions={s['evictions']}" in out
        )
    assert "WARNING" not in out
