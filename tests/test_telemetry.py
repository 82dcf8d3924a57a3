"""``python -m dtdispatch.telemetry``: error cases, merging of sections it does not know, the chart,
and the writer's rank fallbacks (the torchrun run is tests/distributed/test_telemetry.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dtdispatch import _telemetry, telemetry


def _record(rank: int, world_size: int, pid: int, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "dtdispatch-telemetry/1", "rank": rank, "world_size": world_size, "pid": pid,
        "host": "h", "torch_version": "2.13.0", "implementation": stats["implementation"],
        "stats": stats,
    }


def _stats(hits: int, misses: int, impl: str = "native", **extra: Any) -> dict[str, Any]:
    return {
        "hits": hits, "misses": misses, "entries": misses, "evictions": 0,
        "bailouts": {"miss": misses}, "implementation": impl, "threads": {},
        "per_op": {"aten.add.Tensor": {"hits": hits, "misses": misses, "bailouts": misses}},
        "bailouts_per_op": {"aten.add.Tensor": {"miss": misses}}, **extra,
    }


def _write(directory: Path, rec: dict[str, Any]) -> None:
    name = f"dtdispatch-rank{rec['rank']}-of-{rec['world_size']}-pid{rec['pid']}.json"
    (directory / name).write_text(json.dumps(rec))


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = telemetry.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(capsys, str(tmp_path / "nope"))
    assert code == 1 and out == ""
    assert f"error: {tmp_path / 'nope'} is not a directory" in err


def test_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "throughput_rank0.json").write_text("{}")  # other files are not telemetry
    code, _, err = _main(capsys, str(tmp_path))
    assert code == 1
    assert f"no telemetry files (dtdispatch-rank*-of-*-pid*.json) in {tmp_path}" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "cannot read"), ('{"rank": 0}', "is not a dtdispatch-telemetry/1 record"),
     (b"\xff\xfe", "cannot read")],
)
def test_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, message: str
) -> None:
    bad = tmp_path / "dtdispatch-rank0-of-1-pid7.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    code, out, err = _main(capsys, str(tmp_path))
    assert code == 1 and out == ""
    assert f"{bad}" in err and message in err


def test_unknown_sections_are_summed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, _record(0, 2, 11, _stats(5, 1, above={"hits": 3, "by_fn": {"add": 2}})))
    _write(tmp_path, _record(1, 2, 12, _stats(
        1, 3, impl="python", above={"hits": 4, "by_fn": {"add": 1, "mul": 5}})))
    code, out, _ = _main(capsys, str(tmp_path))
    assert code == 0
    assert "implementation native, python" in out
    assert "totals: hits=6 misses=4 bailouts=4 entries=4 evictions=0 hit rate=60.0%" in out
    assert "section above (summed over files): hits=7, by_fn.add=3, by_fn.mul=5" in out
    assert "aten.add.Tensor         6         4         4     60.0%  miss: 4" in out
    assert "rank 1/2 pid 12 on h (python, torch 2.13.0): hits=1 misses=3 bailouts=3" in out
    assert "WARNING" not in out


def test_missing_or_repeated_rank_is_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, _record(1, 2, 12, _stats(1, 1)))
    code, out, _ = _main(capsys, str(tmp_path))
    assert code == 0
    assert "WARNING: 1 file(s) for ranks [1] with world sizes [2]: files missing" in out
    _write(tmp_path, _record(0, 2, 13, _stats(1, 1)))
    _write(tmp_path, _record(0, 2, 14, _stats(1, 1)))  # rank 0 again: a second run
    code, out, _ = _main(capsys, str(tmp_path))
    assert code == 0
    assert "WARNING: 3 file(s) for ranks [0, 1] with world sizes [2]" in out
    assert "totals: hits=3 misses=3" in out  # all files are summed; the warning says why


def test_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    _write(tmp_path, _record(0, 1, 11, _stats(5, 1)))
    chart = tmp_path / "chart.png"
    code, out, _ = _main(capsys, str(tmp_path), "--png", str(chart))
    assert code == 0 and f"chart written to {chart}" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    _write(tmp_path, _record(0, 1, 11, _stats(5, 1)))
    code, _, err = _main(capsys, str(tmp_path), "--png", str(tmp_path / "c.png"))
    assert code == 1 and "--png needs matplotlib" in err and "dtdispatch[plot]" in err
    assert not (tmp_path / "c.png").exists()


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_SIZE")


@pytest.mark.parametrize(
    ("env", "name", "source"),
    [({}, "rank0-of-1", "default (no process group, no launcher environment)"),
     ({"RANK": "3", "WORLD_SIZE": "4"}, "rank3-of-4", "env RANK/WORLD_SIZE"),
     ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "rank1-of-2", "env PMI_RANK/PMI_SIZE")],
)
def test_writer_rank_without_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str, source: str
) -> None:
    assert not dist.is_initialized()
    for var in _LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(_telemetry, "_seen", [])
    path = _telemetry.write(tmp_path / "new")  # created on demand
    assert path.name.startswith(f"dtdispatch-{name}-pid")
    data = json.loads(path.read_text())
    assert data["rank_source"] == source and data["format"] == "dtdispatch-telemetry/1"
    assert [p.name for p in (tmp_path / "new").iterdir()] == [path.name]  # no .tmp left


def test_writer_keeps_a_section_json_cannot_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dtdispatch

    real = dtdispatch.stats
    monkeypatch.setattr(dtdispatch, "stats", lambda: {**real(), "above": {"dtype": torch.float32}})
    data = json.loads(_telemetry.write(tmp_path).read_text())
    assert data["stats"]["above"] == {"dtype": "torch.float32"}
