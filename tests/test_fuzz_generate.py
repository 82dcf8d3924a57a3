"""The fuzz program generator without ranks: reproducible from (seed, index), well-formed on meta
tensors, drawing every feature, shrinkable, and rendered as a script that defines the same
program."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
import torch

from dtdispatch.testing.fuzz import (
    _ASSIGNED,
    _FEATURES,
    EXCLUSIONS,
    Input,
    Program,
    _body,
    _candidates,
    _Gen,
    _meshes_for,
    _meta_input,
    _meta_namespace,
    features,
    generate,
    render,
)


@pytest.mark.parametrize("world_size", [2, 4])
def test_generate_is_reproducible(world_size: int) -> None:
    impls = ["native", "python"]
    first = [generate(5, i, world_size=world_size, impls=impls) for i in range(20)]
    again = [generate(5, i, world_size=world_size, impls=impls) for i in range(20)]
    assert first == again
    assert len({p.lines for p in first}) == 20
    assert {p.impl for p in first} == set(impls)
    meshes = {p.mesh for p in first}
    assert "1d" in meshes and any(m.startswith("sub:") for m in meshes)
    assert ("2d" in meshes) == (world_size == 4)
    assert generate(6, 0, world_size=world_size, impls=impls) != first[0]


def test_render_defines_the_program() -> None:
    program = generate(5, 3, world_size=4, impls=["python"])
    source = render(program, world_size=4)
    namespace: dict[str, Any] = {"__name__": "repro"}
    exec(compile(source, "repro.py", "exec"), namespace)
    assert namespace["program"] == program
    assert isinstance(namespace["program"], Program)
    assert source.startswith("# torchrun --standalone --nproc-per-node 4 repro.py\n")


def test_exclusions_name_a_reason() -> None:
    for needle, exc_type, function, why in EXCLUSIONS:
        assert needle and exc_type.endswith("Error") and len(why) > 20
        assert function == "" or function.isidentifier()


def test_generator_draws_every_feature() -> None:
    """Every drawn feature appears within a fixed prefix (reproducible), and some program runs the
    same call both under an ambient state and outside it (a plan made in one is looked up in the
    other)."""
    wanted = {name for name, _ in _FEATURES} | {"complex", "meta", "autograd entry under no_grad"}
    seen: set[str] = set()
    across_states = 0
    for i in range(400):
        program = generate(5, i, world_size=2, impls=["native", "python"])
        seen |= features(program)
        assigned = [(line, _ASSIGNED.fullmatch(_body(line))) for line in program.lines]
        plain = {m.group(2) for line, m in assigned if m and not line.startswith("with ")}
        across_states += sum(
            m.group(2) in plain for line, m in assigned if m and line.startswith("with ")
        )
    assert wanted <= seen, sorted(wanted - seen)
    assert across_states >= 20


def test_lines_that_raise_only_on_meta_are_kept() -> None:
    """item() and torch.equal need data the generator's meta tensors lack; the lines are drawn."""
    import random

    g = _Gen(rng=random.Random(0), mesh_shape=(2,), sub_mesh=False)
    t0 = g.new_input((3,), "float32")
    assert g.emit(f"t1 = {t0}.sum().item()")
    assert g.emit(f"t2 = torch.equal({t0}, {t0}.clone())")
    assert not g.emit(f"t3 = {t0} @ torch.ones(2)")  # a real shape error is still refused
    assert g.lines == ["t1 = t0.sum().item()", "t2 = torch.equal(t0, t0.clone())"]


def test_shrinking_tries_each_call_outside_its_ambient_state() -> None:
    program = Program(
        mesh="1d",
        impl="python",
        inputs=(Input((2,)),),
        lines=(
            "with torch.no_grad(): t1 = t0 * 2",
            "with CommDebugMode() as cm: t2 = full(t0); t3 = cm.get_comm_counts()",
        ),
    )
    variants = {c.lines for c in _candidates(program)}
    assert ("t1 = t0 * 2", program.lines[1]) in variants
    assert (program.lines[0], "t2 = full(t0)") in variants


@pytest.mark.parametrize(("seed", "index"), [(31, 241), (53, 5604)])
def test_a_partner_of_a_promoted_value_gets_a_drawable_dtype(seed: int, index: int) -> None:
    """Seed 31, program 241 (2 ranks) pairs a complex128 value (a complex64 input promoted by a
    float64 one) with a new input of its dtype, which the generator cannot make, as a broadcast
    partner; seed 53, program 5604 as a cat/stack partner. The new input takes the value's kind
    (complex64) instead of failing."""
    program = generate(seed, index, world_size=2, impls=["native", "python"])
    assert all(
        inp.dtype in ("float32", "float64", "bfloat16", "int64", "bool", "complex64")
        for inp in program.inputs
    )


_IHFFT = re.compile(r"torch\.fft\.ihfft\((t\d+)\)")
_LOSS_PARALLEL = re.compile(r"with loss_parallel\(\): t\d+ = F\.cross_entropy\((t\d+),")
_TIED = re.compile(r"tied\((t\d+),")


@pytest.mark.parametrize("world_size", [2, 4])
def test_programs_avoid_stock_deadlocks(world_size: int) -> None:
    """AVOIDED, as a policy: no ihfft of a tensor that requires grad (stock's backward raises on
    some ranks only), no loss_parallel cross_entropy and no tied embedding on a tensor that may
    have an empty shard (stock raises there only). Checked by replaying each program on meta
    tensors; programs 31 and 466 of seed 53 (4 ranks) drew the last two before."""
    shapes = dict(_meshes_for(world_size))
    checked = {"ihfft": 0, "loss_parallel": 0, "tied": 0}
    known = [(53, 31), (53, 466)] if world_size == 4 else []
    for seed, index in known + [(5, i) for i in range(600)]:
        program = generate(seed, index, world_size=world_size, impls=["python"])
        probe = _Gen(rng=random.Random(0), mesh_shape=shapes[program.mesh], sub_mesh=False)
        ns = _meta_namespace()
        ns.update({f"t{i}": _meta_input(inp) for i, inp in enumerate(program.inputs)})
        for line in program.lines:
            for m in _IHFFT.finditer(line):
                assert not ns[m.group(1)].requires_grad, (seed, index, line)
                checked["ihfft"] += 1
            for m in _LOSS_PARALLEL.finditer(line):
                assert probe.never_empty(ns[m.group(1)]), (seed, index, line)
                checked["loss_parallel"] += 1
            for m in _TIED.finditer(line):
                assert probe.never_empty(ns[m.group(1)]), (seed, index, line)
                checked["tied"] += 1
            try:
                with torch.device("meta"):
                    exec(compile(line, "<fuzz>", "exec"), ns)
            except Exception:  # a line that needs data (item, equal) or the program's last
                pass
    assert min(checked.values()) > 0, checked


_MATERIALIZED = re.compile(r"\b(t\d+) = [^;]*device=cpu")


def test_meta_programs_never_reuse_a_materialized_value() -> None:
    """A meta-device program's value moved to the CPU (``zeros_like(..., device=cpu)``) is never an
    operand later: a meta index into a CPU table (embedding, index_select) reads memory that does
    not exist, in plain torch too, and compared garbage."""
    checked = 0
    for index in range(1500):
        program = generate(5, index, world_size=2, impls=["python"])
        if not any(inp.device == "meta" for inp in program.inputs):
            continue
        materialized: set[str] = set()
        for line in program.lines:
            operands = set(re.findall(r"\bt\d+\b", line.split(" = ", 1)[-1]))
            assert not operands & materialized, (index, line)
            checked += bool(materialized)
            materialized |= set(_MATERIALIZED.findall(line))
    assert checked > 0


def test_shrinking_moves_meta_inputs_to_the_cpu_together() -> None:
    """A candidate never mixes meta and CPU inputs (a meta index into a CPU table reads garbage);
    one moves them all."""
    program = Program(
        mesh="1d",
        impl="python",
        inputs=(
            Input((4, 2), placements=("S0",), seed=1, device="meta"),
            Input((3,), dtype="int64", placements=("R",), seed=2, high=4, device="meta"),
        ),
        lines=("t2 = F.embedding(t1, t0)",),
        rng_seed=1,
    )
    devices = [{inp.device for inp in c.inputs} for c in _candidates(program)]
    assert {"cpu"} in devices
    assert all(len(d) == 1 for d in devices)


def test_a_raised_outcome_says_where_it_was_raised() -> None:
    """A failure report names the function, file and line an exception came from (a failure that
    needs a long history to reproduce is then diagnosable from the report alone)."""
    from dtdispatch.testing.fuzz import _Outcome, _outcome_text

    def materialize() -> None:
        raise AssertionError

    try:
        materialize()
    except AssertionError as exc:
        raised = exc
    text = _outcome_text(_Outcome({}, 2, raised))
    assert text.startswith("line 2 AssertionError:  (raised in materialize, "), text
    assert f"{__file__}:" in text, text
    assert _outcome_text(_Outcome({}, None, None)) == "no error"
