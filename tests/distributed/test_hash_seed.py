"""Ranks started with different ``PYTHONHASHSEED`` values (as any launcher leaves them) choose the
same sharding strategies: torch breaks cost ties in the iteration order of sets of placements, and
a Partial's hash is the same in every process once dtdispatch is imported
(``dtdispatch._hash_seed``; ARCHITECTURE "Where dtdispatch differs from stock on purpose")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Partial
from torch.distributed.tensor.placement_types import _MaskPartial

from dtdispatch import _hash_seed

JOB = str(Path(__file__).with_name("_hash_seed_job.py"))
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ranks_with_different_hash_seeds_agree_on_strategies() -> None:
    """Two gloo ranks with hash seeds 0 and 1 (under which stock's candidate orders differ for
    this job's linear: one rank all-gathers the weight, the other reduce-scatters the input, and
    the job deadlocks) run the job to the end with the right values, stock and FastDTensor."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, JOB],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONHASHSEED": str(rank),
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, out
        assert f"hash seed job ok on rank {rank}" in out, out


def test_partials_hash_is_seed_independent_and_keeps_equality() -> None:
    """Installed (at import): equal placements hash alike, the hash is not Python's seeded string
    hash nor a buffer's address, and installing again changes nothing."""
    assert Partial.__hash__ is _hash_seed._stable_hash
    assert _MaskPartial.__hash__ is _hash_seed._stable_mask_hash
    before = hash(Partial("max")), hash(_mask())
    _hash_seed.install()
    assert (hash(Partial("max")), hash(_mask())) == before
    for op in ("sum", "avg", "max", "min", "product"):
        assert Partial(op) == Partial(op) and hash(Partial(op)) == hash(Partial(op))
        if sys.flags.hash_randomization:
            assert hash(Partial(op)) != 1 + hash(op)
    assert len({Partial("sum"), Partial("sum"), Partial("max")}) == 2
    one, other = _mask(), _mask()
    same_buffer = _MaskPartial(  # type: ignore[no-untyped-call]
        reduce_op="sum", mask_buffer=one.mask_buffer, offset_shape=one.offset_shape, offset_dim=0
    )
    assert one != other and hash(one) == hash(other)  # equality still asks for the same buffer
    assert one == same_buffer and len({one, other, same_buffer}) == 2


def _mask() -> _MaskPartial:
    return _MaskPartial(reduce_op="sum", offset_shape=torch.Size([8, 4]), offset_dim=0)  # type: ignore[no-untyped-call]


_HASHES = """
import dtdispatch, torch
from torch.distributed.tensor import Partial
from torch.distributed.tensor.placement_types import _MaskPartial
mask = _MaskPartial(reduce_op="sum", offset_shape=torch.Size([8, 4]), offset_dim=0)
print(hash(Partial("sum")), hash(mask))
"""


@pytest.mark.parametrize("seed", ["0", "1"])
def test_partials_hash_is_the_same_in_every_process(seed: str) -> None:
    """A fresh process's hashes of a Partial and a _MaskPartial are this process's, whatever its
    hash seed and its mask buffer's address."""
    out = subprocess.run(
        [sys.executable, "-c", _HASHES], env={**os.environ, "PYTHONHASHSEED": seed}, text=True,
        capture_output=True, timeout=TIMEOUT_S, check=True,
    ).stdout
    assert [int(h) for h in out.split()] == [hash(Partial("sum")), hash(_mask())]
