"""pytest plugin: ``@pytest.mark.distributed(world_size=N)`` runs a test body on N ranks.

Marker arguments: ``world_size`` (int >= 1, required; may be positional), ``timeout`` (seconds;
default ``DTDISPATCH_TEST_TIMEOUT``, else the ``dtdispatch_timeout`` ini value, else 60),
``backend`` ("auto", "gloo" or "nccl") and ``device`` ("cpu" or "cuda"). "auto" means nccl when at
least N GPUs are visible, else gloo; ``DTDISPATCH_TEST_BACKEND=gloo`` makes "auto" mean gloo.
A test that asks for nccl or cuda is skipped when fewer than N GPUs are visible.

The parent process never runs the body: ``pytest_pyfunc_call`` sends it to the pool of live ranks
for (N, backend) and turns the ranks' reports into the test outcome.
"""

from __future__ import annotations

import atexit
import inspect
import multiprocessing.forkserver
import os
import pickle
import sys
from dataclasses import dataclass

import pytest

from dtdispatch.testing._pool import PoolError, RankPool
from dtdispatch.testing._worker import Job

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "DTDISPATCH_TEST_TIMEOUT"
BACKEND_ENV = "DTDISPATCH_TEST_BACKEND"
RANK_ARGS = ("rank", "world_size")


@dataclass(frozen=True)
class DistSpec:
    """A validated ``distributed`` marker."""

    world_size: int
    backend: str  # "gloo" or "nccl", resolved
    timeout: float


_SPEC = pytest.StashKey[DistSpec]()
_pools: dict[tuple[int, str], RankPool] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "dtdispatch_timeout",
        f"default per-test timeout of distributed tests in seconds ({DEFAULT_TIMEOUT_S:g})",
        default=None,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "distributed(world_size, *, timeout=None, backend='auto', device=None): "
        "run the test body on world_size ranks (dtdispatch.testing)",
    )


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _default_timeout(config: pytest.Config) -> float:
    env = os.environ.get(TIMEOUT_ENV)
    if env:
        try:
            return _positive(TIMEOUT_ENV, float(env))
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a positive number, got {env!r}") from None
    ini = config.getini("dtdispatch_timeout")
    return _positive("dtdispatch_timeout", float(ini)) if ini else DEFAULT_TIMEOUT_S


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _parse(item: pytest.Item, marker: pytest.Mark) -> DistSpec:
    """Validate the marker (ValueError naming the bad value) and resolve the backend."""
    if len(marker.args) > 1:
        raise ValueError(f"distributed takes one positional argument, got {marker.args!r}")
    kwargs = dict(marker.kwargs)
    if marker.args:
        kwargs.setdefault("world_size", marker.args[0])
    unknown = set(kwargs) - {"world_size", "timeout", "backend", "device"}
    if unknown:
        raise ValueError(f"unknown distributed marker argument(s): {sorted(unknown)}")
    world_size = kwargs.get("world_size")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"distributed world_size must be an int >= 1, got {world_size!r}")
    timeout = kwargs.get("timeout")
    timeout = _default_timeout(item.config) if timeout is None else _positive("timeout", timeout)
    backend = kwargs.get("backend", "auto")
    device = kwargs.get("device")
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"distributed backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"distributed device must be 'cpu' or 'cuda', got {device!r}")
    if (device, backend) in (("cpu", "nccl"), ("cuda", "gloo")):
        raise ValueError(f"distributed device={device!r} contradicts backend={backend!r}")
    if device == "cuda" or backend == "nccl":
        gpus = _gpu_count()
        if gpus < world_size:
            pytest.skip(f"needs {world_size} GPU(s) for nccl, {gpus} visible")
        backend = "nccl"
    elif device == "cpu" or backend == "gloo" or os.environ.get(BACKEND_ENV) == "gloo":
        backend = "gloo"
    else:
        backend = "nccl" if _gpu_count() >= world_size else "gloo"
    return DistSpec(world_size, backend, timeout)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("distributed")
    if marker is not None:
        item.stash[_SPEC] = _parse(item, marker)


def _marked(request: pytest.FixtureRequest) -> DistSpec:
    spec: DistSpec | None = request.node.stash.get(_SPEC, None)
    if spec is None:
        pytest.fail(f"the {request.fixturename!r} fixture only exists in tests marked "
                    "@pytest.mark.distributed", pytrace=False)
    return spec


@pytest.fixture
def rank(request: pytest.FixtureRequest) -> None:
    """Placeholder in the parent; each rank receives its own rank as this argument."""
    _marked(request)


@pytest.fixture
def world_size(request: pytest.FixtureRequest) -> int:
    """The marker's world size (each rank receives the same value)."""
    return _marked(request).world_size


def _job(item: pytest.Function) -> Job:
    """Describe the test body for the ranks: module, function and its parametrize arguments."""
    if item.cls is not None or inspect.iscoroutinefunction(item.obj):
        pytest.fail("distributed tests must be plain module-level functions", pytrace=False)
    params = item.callspec.params if hasattr(item, "callspec") else {}
    kwargs = {}
    for name in inspect.signature(item.obj).parameters:
        if name in RANK_ARGS:
            continue
        if name not in params:
            pytest.fail(f"distributed test argument {name!r}: only rank, world_size and "
                        "@pytest.mark.parametrize arguments reach the ranks", pytrace=False)
        kwargs[name] = item.funcargs[name]
    module = item.module
    assert module is not None and module.__file__ is not None
    job = Job(module.__name__, module.__file__, item.originalname, kwargs, list(sys.path))
    try:
        pickle.dumps(job)
    except Exception as e:
        pytest.fail(f"parametrize arguments of a distributed test must be picklable: {e}",
                    pytrace=False)
    return job


def _pool(spec: DistSpec) -> RankPool:
    """The live pool for this world size and backend; a fresh one if the last is unhealthy."""
    key = (spec.world_size, spec.backend)
    pool = _pools.get(key)
    if pool is not None and not pool.healthy():
        pool.kill()
        del _pools[key]
        pool = None
    if pool is None:
        try:
            pool = RankPool(spec.world_size, spec.backend)
        except PoolError as e:
            pytest.fail(str(e), pytrace=False)
        _pools[key] = pool
    return pool


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    spec = pyfuncitem.stash.get(_SPEC, None)
    if spec is None:
        return None
    job = _job(pyfuncitem)
    pool = _pool(spec)
    outcome, message = pool.run(job, spec.timeout)
    if outcome == "failed":
        del _pools[(spec.world_size, spec.backend)]  # run() killed it
        pytest.fail(message, pytrace=False)
    if outcome == "skipped":
        pytest.skip(message)
    return True


def shutdown_pools() -> None:
    """Stop every pool of this process, then the forkserver (session end; atexit as a fallback).

    The forkserver would exit by itself once this process is gone, but only later; stopping it
    here (a private but long-standing multiprocessing method) leaves nothing behind at exit.
    """
    while _pools:
        _pools.popitem()[1].shutdown()
    stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
    if stop is not None:
        stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutdown_pools()


atexit.register(shutdown_pools)
