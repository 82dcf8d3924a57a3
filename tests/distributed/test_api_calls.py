"""FastDTensor's DTensor API calls (redistribute, from_local, to_local, full_tensor) against stock
on real ranks: forward (local shard bitwise with shape and stride, spec, requires_grad, grad_fn
names, object identity) and backward (gradient values, types, placements), including
redistributions that communicate, uneven shards, grad_placements and double backward."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import dtdispatch
from dtdispatch import FastDTensor
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native
from dtdispatch.testing import mesh_1d, mesh_2d

from ._compare import IMPLS, outcome, same, same_outcome


@contextmanager
def _recording(module: Any, name: str, record: Callable[..., None]) -> Iterator[None]:
    """``module.name`` replaced, for the duration, by a wrapper that calls ``record`` with the
    call's arguments and then the original."""
    original = getattr(module, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        record(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(module, name, call)
    try:
        yield
    finally:
        setattr(module, name, original)


def _value(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape) / 7.0


def _input(mesh: Any, shape: tuple[int, ...], placements: tuple[Any, ...], grad: bool) -> DTensor:
    """A stock DTensor leaf: distributed from one global value, or (any Partial placement) built
    from rank-dependent local values."""
    if any(p.is_partial() for p in placements):
        rank = torch.distributed.get_rank()
        local = _value(shape) * (rank + 1)
        t = DTensor.from_local(
            local, mesh, placements, shape=torch.Size(shape), stride=local.stride()
        )
        t = t.detach()
    else:
        t = distribute_tensor(_value(shape), mesh, placements)
    return t.requires_grad_(grad)


def _pair(
    mesh: Any, shape: tuple[int, ...], placements: tuple[Any, ...], grad: bool
) -> tuple[DTensor, DTensor]:
    stock = _input(mesh, shape, placements, grad)
    fast = dtdispatch.accelerate(stock.detach()).requires_grad_(grad)
    return stock, fast


def _same_autograd(stock: torch.Tensor, fast: torch.Tensor, what: str) -> None:
    assert fast.requires_grad == stock.requires_grad, what
    assert fast.is_leaf == stock.is_leaf, what
    names = [type(t.grad_fn).__name__ if t.grad_fn is not None else None for t in (stock, fast)]
    assert names[0] == names[1], (what, names)


def _check_call(
    mesh: Any,
    shape: tuple[int, ...],
    placements: tuple[Any, ...],
    call: Callable[[DTensor], torch.Tensor],
    what: str,
) -> None:
    """``call`` on stock and on FastDTensor, without grad, with grad, and backward through it."""
    for mode in ("no_grad", "leaf without grad", "grad"):
        stock, fast = _pair(mesh, shape, placements, grad=mode != "leaf without grad")
        with torch.set_grad_enabled(mode != "no_grad"):
            outs = call(stock), call(fast)
        label = f"{what} [{mode}]"
        same(outs[1], outs[0], label)
        _same_autograd(*outs, label)
        if mode != "grad":
            continue
        weight = (
            _value(outs[0].to_local().shape if isinstance(outs[0], DTensor) else outs[0].shape)
            + 1.0
        )
        for out in outs:
            local = out.to_local() if isinstance(out, DTensor) else out
            (local * weight).sum().backward()
        same(fast.grad, stock.grad, f"{label} gradient")


REDISTRIBUTIONS = [
    # (global shape, from, to): communicating ones, local ones, no-ops, negative dims, uneven
    ((4, 6), (Shard(0),), (Replicate(),)),
    ((4, 6), (Replicate(),), (Shard(1),)),
    ((4, 6), (Shard(0),), (Shard(1),)),
    ((4, 6), (Partial(),), (Replicate(),)),
    ((4, 6), (Partial(),), (Shard(0),)),
    ((4, 6), (Shard(1),), (Shard(-1),)),
    ((4, 6), (Replicate(),), (Replicate(),)),
    ((5, 3), (Replicate(),), (Shard(0),)),
    ((5, 3), (Shard(0),), (Replicate(),)),
    ((3, 1), (Replicate(),), (Shard(0),)),
    ((2, 3, 5), (Replicate(),), (Shard(2),)),
    # the direct collectives (ARCHITECTURE "The DTensor API calls"): sequence-parallel gathers on
    # dim 1 (torch's concatenation and its view), reduce-scatters on dims 0 and 1, an uneven one
    ((2, 4, 6), (Shard(1),), (Replicate(),)),
    ((1, 4, 6), (Shard(1),), (Replicate(),)),
    ((2, 4, 6), (Partial(),), (Shard(1),)),
    ((5, 3), (Partial(),), (Shard(0),)),
]

# (global shape, from, to) that run one direct collective (ARCHITECTURE "The DTensor API calls").
DIRECT = [
    ((4, 6), (Shard(0),), (Replicate(),)),
    ((2, 4, 6), (Shard(1),), (Replicate(),)),
    ((1, 4, 6), (Shard(1),), (Replicate(),)),
    ((4, 6), (Partial(),), (Replicate(),)),
    ((4, 6), (Partial(),), (Shard(0),)),
    ((2, 4, 6), (Partial(),), (Shard(1),)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_api_calls_match_stock_1d(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    mesh = mesh_1d()
    for shape, src, dst in REDISTRIBUTIONS:
        _check_call(
            mesh,
            shape,
            src,
            lambda t, dst=dst: t.redistribute(mesh, dst),
            f"redistribute {src}->{dst} {shape}",
        )
        _check_call(
            mesh,
            shape,
            src,
            lambda t, dst=dst: t.redistribute(placements=list(dst), async_op=True),
            f"redistribute async {src}->{dst} {shape}",
        )
    for shape, src in [
        ((4, 6), (Shard(0),)),
        ((5, 3), (Shard(1),)),
        ((4, 6), (Partial(),)),
        ((4, 6), (Replicate(),)),
    ]:
        _check_call(mesh, shape, src, lambda t: t.to_local(), f"to_local {src}")
        _check_call(mesh, shape, src, lambda t: t.full_tensor(), f"full_tensor {src}")
        # grad_placements that describe the local gradient: the input's own layout (Partial
        # input: a replicated or a partial gradient), or a partial sum of a replicated one.
        grad_layouts = [src, (Replicate(),)] if src == (Partial(),) else [src]
        if src == (Replicate(),):
            grad_layouts.append((Partial(),))
        for gp in grad_layouts:
            _check_call(
                mesh,
                shape,
                src,
                lambda t, gp=gp: t.to_local(grad_placements=gp),
                f"to_local grad_placements={gp} {src}",
            )
        for gp in ((Replicate(),), [Partial()]):
            _check_call(
                mesh,
                shape,
                src,
                lambda t, gp=gp: t.full_tensor(grad_placements=gp),
                f"full_tensor grad_placements={gp} {src}",
            )


@pytest.mark.distributed(world_size=2, timeout=120)
def test_direct_collectives_replace_torchs_function(rank: int, world_size: int) -> None:
    """The redistributions of ``DIRECT`` (forward and the backward's reverse, synchronous and
    asynchronous) and ``full_tensor`` never reach torch's ``redistribute_local_tensor``; under a
    dispatch mode, on a non-contiguous local or another dtype they do, bitwise as stock either
    way."""
    from dtdispatch import _tensor

    dispatcher.install(native.DEFAULT)
    mesh = mesh_1d()
    calls: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(f"{args[1].placements}->{args[2].placements}")

    with _recording(_tensor, "redistribute_local_tensor", counted):
        _direct_cases(mesh, calls)


def _direct_cases(mesh: Any, calls: list[str]) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    pending = torch._C._distributed_c10d._get_work_registry_size  # process-wide, other tests' too
    before = pending()
    for shape, src, dst in DIRECT:
        for async_op in (False, True):
            what = f"redistribute {src}->{dst} {shape} async_op={async_op}"
            _check_call(
                mesh,
                shape,
                src,
                lambda t, dst=dst, a=async_op: t.redistribute(mesh, dst, async_op=a),
                what,
            )
            if not (async_op and shape == (1, 4, 6)):
                assert calls == [], (what, calls)
            else:  # torch returns a view of its AsyncCollectiveTensor there: its path
                assert calls, what
                calls.clear()
    # every asynchronous collective was waited on by its first use, as torch's
    assert pending() == before, (pending(), before)
    _check_call(mesh, (4, 6), (Shard(0),), lambda t: t.full_tensor(), "full_tensor")
    assert calls == [], calls

    # Under inference mode (the outputs are inference tensors on both sides).
    for shape, src, dst in DIRECT:
        stock, fast = _pair(mesh, shape, src, grad=False)
        with torch.inference_mode():
            same(fast.redistribute(mesh, dst), stock.redistribute(mesh, dst), f"inference {dst}")
    assert calls == [], calls

    # Torch's path, where a mode observes the collectives, for a non-contiguous local (a transposed
    # shard), an integer reduction and a complex gather.
    with CommDebugMode() as comm:
        _check_call(
            mesh, (4, 6), (Shard(0),), lambda t: t.redistribute(mesh, (Replicate(),)), "mode"
        )
    assert comm.get_total_counts() > 0
    # the three forwards, and the one backward (its local chunk: the mode sees torch's split)
    assert len(calls) == 4, calls
    calls.clear()
    _check_call(
        mesh, (6, 4), (Shard(1),), lambda t: t.t().redistribute(mesh, (Replicate(),)),
        "non-contiguous local",
    )
    assert calls, "a non-contiguous local took the direct all-gather"
    calls.clear()
    local = torch.arange(24).reshape(4, 6) * (torch.distributed.get_rank() + 1)
    stock = DTensor.from_local(local, mesh, (Partial(),))
    fast = dtdispatch.accelerate(DTensor.from_local(local.clone(), mesh, (Partial(),)))
    same(fast.redistribute(mesh, (Replicate(),)), stock.redistribute(mesh, (Replicate(),)))
    assert calls, "an integer reduction took the direct all-reduce"
    calls.clear()
    value = torch.complex(_value((4, 6)), -_value((4, 6)))
    stock = distribute_tensor(value, mesh, (Shard(0),))
    fast = dtdispatch.accelerate(distribute_tensor(value, mesh, (Shard(0),)))
    same(fast.redistribute(mesh, (Replicate(),)), stock.redistribute(mesh, (Replicate(),)))
    assert calls, "a complex gather took the direct all-gather"
    calls.clear()
    from dtdispatch import _collectives

    _collectives.ENABLED = False  # DTDISPATCH_DIRECT_COLLECTIVES=0
    try:
        _check_call(
            mesh, (4, 6), (Partial(),), lambda t: t.redistribute(mesh, (Replicate(),)), "off"
        )
    finally:
        _collectives.ENABLED = True
    assert len(calls) == 3, calls  # the three forwards; each backward is a no-op


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_dispatch_path_redistributes_arguments_directly(
    rank: int, world_size: int, impl: str
) -> None:
    """An op whose plan redistributes an argument (the dispatch path's "needs redistribution")
    takes the direct collective, on its first call (the slow path's executor) and on every hit,
    bitwise as stock."""
    from dtdispatch import _collectives

    dispatcher.install(impl)
    mesh = mesh_1d()
    a = distribute_tensor(_value((4, 6)), mesh, (Shard(0),))
    b = distribute_tensor(_value((6, 4)), mesh, (Shard(0),))
    p = DTensor.from_local(_value((4, 6)) * (rank + 1), mesh, (Partial(),))
    r = distribute_tensor(_value((4, 6)), mesh, (Replicate(),))
    stock = {"a": a, "b": b, "p": p, "r": r}
    fast = {name: dtdispatch.accelerate(t.detach()) for name, t in stock.items()}
    taken: list[str] = []
    with ExitStack() as stack:
        for name in ("all_gather", "all_reduce_sum", "reduce_scatter_sum"):
            stack.enter_context(
                _recording(_collectives, name, lambda *_, name=name, **__: taken.append(name))
            )
        for _ in range(3):
            # mm(S0, S0) gathers its second argument; relu reduces its Partial argument
            same(torch.mm(fast["a"], fast["b"]), torch.mm(a, b), "mm S0 x S0")
            same(torch.relu(fast["p"]), torch.relu(p), "relu Partial")
    assert taken == ["all_gather", "all_reduce_sum"] * 3, taken


@pytest.mark.distributed(world_size=2, timeout=120)
def test_direct_collectives_use_each_meshs_own_group(rank: int, world_size: int) -> None:
    """Two meshes over the same ranks from different process groups compare equal (and so do their
    specs, the plan cache's key): each redistribution's collective runs on its own mesh's group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from dtdispatch import _collectives

    meshes = [DeviceMesh.from_group(dist.new_group([0, 1]), "cpu") for _ in range(2)]
    assert meshes[0] == meshes[1] and meshes[0].get_group(0) is not meshes[1].get_group(0)
    groups: list[Any] = []
    with _recording(_collectives, "all_gather", lambda local, group, *_: groups.append(group)):
        for mesh in meshes:
            stock = distribute_tensor(_value((4, 6)), mesh, (Shard(0),))
            fast = dtdispatch.accelerate(distribute_tensor(_value((4, 6)), mesh, (Shard(0),)))
            same(fast.redistribute(mesh, (Replicate(),)), stock.redistribute(mesh, (Replicate(),)))
    assert groups == [m.get_group(0) for m in meshes], groups


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_a_local_that_requires_grad_records_no_graph(rank: int, world_size: int, impl: str) -> None:
    """``from_local`` of a leaf under ``no_grad`` gives a DTensor that does not require grad on a
    local that does. Stock's API calls run their transforms inside autograd Functions, with grad
    mode off: under grad mode their results record no graph, and neither do dtdispatch's (direct
    collectives, torch's function and the fresh views of to_local and full_tensor)."""
    dispatcher.install(impl)
    mesh = mesh_1d()
    for placements, call in [
        ((Partial(),), lambda t: t.redistribute(mesh, (Replicate(),))),
        ((Partial(),), lambda t: t.redistribute(mesh, (Shard(0),))),
        ((Shard(0),), lambda t: t.redistribute(mesh, (Replicate(),))),
        ((Shard(0),), lambda t: t.full_tensor()),
        ((Shard(0),), lambda t: t.to_local()),
    ]:
        results = []
        for from_local in (DTensor.from_local, FastDTensor.from_local):
            leaf = _value((4, 6)).requires_grad_()
            with torch.no_grad():
                t = from_local(leaf, mesh, placements)
            assert not t.requires_grad and t._local_tensor.requires_grad
            results.append(call(t))
        stock, fast = results
        same(fast, stock, f"{placements} {call}")
        local = fast._local_tensor if isinstance(fast, DTensor) else fast
        assert local.grad_fn is None


def _from_local_case(
    local: torch.Tensor, placements: Any, grad: bool, **kwargs: Any
) -> tuple[tuple[DTensor, torch.Tensor], tuple[DTensor, torch.Tensor]]:
    results = []
    for from_local in (DTensor.from_local, FastDTensor.from_local):
        leaf = local.clone().requires_grad_(grad)
        results.append((from_local(leaf, mesh_1d(), placements, **kwargs), leaf))
    return results[0], results[1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_from_local_matches_stock(rank: int, world_size: int, impl: str) -> None:
    dispatcher.install(impl)
    local = _value((3, 4)) + rank
    uneven = {"shape": torch.Size((5, 4)), "stride": (4, 1)}
    cases: list[tuple[Any, dict[str, Any]]] = [
        ((Shard(0),), {}),
        ([Shard(-1)], {}),
        ((Replicate(),), {}),
        ((Partial(),), {}),
        (None, {}),
        ((Shard(0),), uneven),
        # grad_placements that keep the local gradient's shape
        ((Shard(0),), {"grad_placements": (Shard(0),)}),
        ((Partial(),), {"grad_placements": [Replicate()]}),
        ((Replicate(),), {"grad_placements": (Partial(),)}),
    ]
    for placements, kwargs in cases:
        what = f"from_local {placements} {kwargs}"
        # uneven: 5 rows as 3 + 2
        mine = local[: 3 - rank] if kwargs.get("shape") else local
        for mode in ("no_grad", "leaf without grad", "grad"):
            with torch.set_grad_enabled(mode != "no_grad"):
                (s, s_leaf), (f, f_leaf) = _from_local_case(
                    mine, placements, mode != "leaf without grad", **kwargs
                )
            same(f, s, f"{what} [{mode}]")
            _same_autograd(s, f, f"{what} [{mode}]")
            assert f._local_tensor is not f_leaf  # a fresh view, as stock
            assert f._local_tensor.requires_grad == s._local_tensor.requires_grad
        # backward: the plain local gradient, redistributed as stock does
        weight = _value(s.to_local().shape) * (rank + 2)
        for out in (s, f):
            (
                out.redistribute(placements=[Replicate()]).to_local().sum()
                + (out.to_local() * weight).sum()
            ).backward()
        same(f_leaf.grad, s_leaf.grad, f"{what} gradient")
    # torch's own errors, unchanged
    with pytest.raises(RuntimeError, match="Please pass both shape and stride"):
        FastDTensor.from_local(local, mesh_1d(), [Shard(0)], shape=torch.Size((6, 4)))
    with pytest.raises(RuntimeError, match=r"only accepts torch\.Tensor"):
        FastDTensor.from_local(
            dtdispatch.accelerate(distribute_tensor(local, mesh_1d())), mesh_1d()
        )


@pytest.mark.distributed(world_size=2, timeout=120)
def test_same_placements_and_errors(rank: int, world_size: int) -> None:
    mesh = mesh_1d()
    fast = dtdispatch.accelerate(distribute_tensor(_value((4, 4)), mesh, [Shard(0)]))
    stock = dtdispatch.to_torch(fast)
    for t in (stock, fast):
        noop = t.redistribute(placements=[Shard(0)])
        # stock: a new DTensor object on the same local tensor and the same spec object
        assert noop is not t and noop._local_tensor is t._local_tensor and noop._spec is t._spec
        with torch.no_grad():
            assert t.to_local() is t._local_tensor
        with pytest.raises(RuntimeError, match="placements is needed"):
            t.redistribute(mesh)
    # to a new Partial: torch 2.13 refuses ("for internal use only"), 2.14 allows it; both as stock
    outcomes = [outcome(lambda t: t.redistribute(placements=[Partial()]), t) for t in (stock, fast)]
    same_outcome(outcomes[1], outcomes[0], "Shard -> Partial")
    # placements that do not fit the mesh: whatever torch does (it does not check), on both
    odd = [t.redistribute(placements=[Shard(0), Replicate()]) for t in (stock, fast)]
    same(odd[1], odd[0], "two placements on a 1-D mesh")
    # a Parameter's local tensor is a Parameter too from torch 2.13 (gh-166156): as on stock
    # (torch.__version__ compares as a version, not as a string)
    is_param = [
        isinstance(torch.nn.Parameter(t.clone()).to_local(), torch.nn.Parameter)
        for t in (stock, fast)
    ]
    assert is_param[1] is is_param[0]
    if torch.__version__ >= (2, 13):
        assert is_param[0]


@pytest.mark.distributed(world_size=2, timeout=120)
def test_double_backward_matches_stock(rank: int, world_size: int) -> None:
    mesh = mesh_1d()
    grads = []
    for convert in (lambda t: t, dtdispatch.accelerate):
        x = convert(distribute_tensor(_value((4, 4)), mesh, [Shard(0)])).requires_grad_()
        y = x.redistribute(placements=[Replicate()]).to_local()
        (g,) = torch.autograd.grad((y * y * y).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g.to_local() * g.to_local()).sum(), x)
        grads.append((g, gg))
    (g_s, gg_s), (g_f, gg_f) = grads
    assert torch.equal(g_s.to_local(), g_f.to_local()) and g_s.placements == g_f.placements
    assert torch.equal(gg_s.to_local(), gg_f.to_local()) and gg_s.placements == gg_f.placements


@pytest.mark.distributed(world_size=4, timeout=120)
def test_api_calls_match_stock_2d(rank: int, world_size: int) -> None:
    dispatcher.install(native.DEFAULT)
    mesh = mesh_2d()
    cases = [
        ((4, 6), (Shard(0), Replicate()), (Replicate(), Shard(1))),
        ((4, 6), (Replicate(), Replicate()), (Shard(0), Shard(1))),
        ((4, 6), (Replicate(), Replicate()), (Replicate(), Shard(0))),
        ((5, 3), (Replicate(), Replicate()), (Shard(0), Shard(0))),
        ((4, 6), (Partial(), Shard(0)), (Replicate(), Shard(0))),
        ((4, 6), (Shard(0), Shard(1)), (Shard(0), Shard(1))),
    ]
    for shape, src, dst in cases:
        _check_call(
            mesh,
            shape,
            src,
            lambda t, dst=dst: t.redistribute(mesh, dst),
            f"redistribute {src}->{dst} {shape}",
        )
    # The direct collectives on 4 ranks, where the reduction order decides the bits, and on each
    # 1-D sub-mesh of the 2-D one (its own process group).
    for line in (mesh_1d(), mesh["dp"], mesh["tp"]):
        for shape, src, dst in [*DIRECT, ((8, 3, 4), (Partial(),), (Shard(1),))]:
            _check_call(
                line,
                shape,
                src,
                lambda t, dst=dst, line=line: t.redistribute(line, dst),
                f"redistribute 1-D {line} {src}->{dst} {shape}",
            )
    for shape, src in [((4, 6), (Shard(0), Shard(1))), ((5, 3), (Partial(), Shard(0)))]:
        _check_call(mesh, shape, src, lambda t: t.full_tensor(), f"full_tensor {src}")
        _check_call(
            mesh,
            shape,
            src,
            lambda t: t.to_local(grad_placements=(Replicate(), Shard(0))),
            f"to_local {src}",
        )


class _TwoInputs(torch.nn.Module):
    """Two projections of two inputs (one by keyword), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(4, 8)
        self.down = torch.nn.Linear(8, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, *, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.down(self.up(x))
        return self.norm(h + y), h


def _styled(accelerate: bool) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    model = _TwoInputs()
    mesh = mesh_1d()
    parallelize_module(
        model,
        mesh,
        PrepareModuleInput(
            input_layouts=(Shard(0),),
            desired_input_layouts=(Replicate(),),
            input_kwarg_layouts={"y": Shard(0)},
            desired_input_kwarg_layouts={"y": Replicate()},
            use_local_output=False,
        ),
    )
    parallelize_module(
        model,
        mesh,
        PrepareModuleOutput(
            output_layouts=(Shard(0), None),
            desired_output_layouts=(Replicate(), None),
            use_local_output=True,
        ),
    )
    parallelize_module(
        model,
        mesh,
        {
            "up": ColwiseParallel(),
            "down": RowwiseParallel(output_layouts=Shard(0), use_local_output=False),
            "norm": SequenceParallel(sequence_dim=0),
        },
    )
    return dtdispatch.accelerate(model) if accelerate else model


@pytest.mark.distributed(world_size=2, timeout=120)
def test_style_hooks_match_stock(rank: int, world_size: int) -> None:
    """Every torch style's hook is replaced by its dtdispatch twin (kwargs, several outputs, None
    layouts, use_local_output both ways), forward and backward equal stock's, gradients are
    FastDTensors; unwrap_hooks restores torch's own hooks."""
    from dtdispatch._training import _StyleHook, unwrap_hooks, wrap_hooks

    stock, fast = _styled(False), _styled(True)
    hooks = [
        h
        for m in fast.modules()
        for d in (m._forward_pre_hooks, m._forward_hooks)
        for h in d.values()
    ]
    assert len(hooks) == 8 and all(type(h) is _StyleHook for h in hooks)
    torch.manual_seed(1 + rank)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    results, seen = [], []
    for model in (stock, fast):
        layouts: list[Any] = []
        seen.append(layouts)
        for sub in (model.up, model.down, model.norm):
            # user hooks run after the style's: they see the prepared inputs and outputs
            sub.register_forward_hook(
                lambda mod, args, out, layouts=layouts: layouts.extend(
                    (type(t).__name__, getattr(t, "placements", None)) for t in (*args, out)
                )
            )
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        out, h = model(xs, y=ys)
        assert type(out) is torch.Tensor
        ((out * out).sum() + h.to_local().sum()).backward()
        results.append((out, h, xs.grad, ys.grad, {n: p.grad for n, p in model.named_parameters()}))
    (s_out, s_h, s_xg, s_yg, s_grads), (f_out, f_h, f_xg, f_yg, f_grads) = results
    # Under grad mode every layout here is in the autograd role (ARCHITECTURE "Two roles: replay
    # and autograd").
    renamed = [(name.replace("AutogradFastDTensor", "DTensor"), p) for name, p in seen[1]]
    assert renamed == seen[0] and len(seen[0]) == 6, seen
    assert type(s_h) is DTensor and isinstance(f_h, FastDTensor)
    assert s_h.placements == f_h.placements
    for a, b in ((s_out, f_out), (s_h.to_local(), f_h.to_local()), (s_xg, f_xg), (s_yg, f_yg)):
        assert torch.equal(a, b)
    for name, grad in s_grads.items():
        assert isinstance(f_grads[name], FastDTensor), name
        assert f_grads[name].placements == grad.placements, name
        assert torch.equal(f_grads[name].to_local(), grad.to_local()), name
    # a plain DTensor input meets a twin: made a FastDTensor first, same result
    with torch.no_grad():
        dx = distribute_tensor(x, mesh_1d(), [Replicate()])
        assert torch.equal(stock.up(dx), fast.up(dx))
    assert unwrap_hooks(fast) == 8
    assert unwrap_hooks(fast) == 0 and wrap_hooks(fast) == 8


@pytest.mark.distributed(world_size=2, timeout=60)
def test_rank_outside_the_mesh_matches_stock(rank: int, world_size: int) -> None:
    """On a mesh of rank 0 only, rank 1 computes nothing (empty local tensors), as in stock."""
    from dtdispatch.testing import sub_mesh

    mesh = sub_mesh([0])
    local = _value((3, 4))
    results = []
    for from_local in (DTensor.from_local, FastDTensor.from_local):
        t = from_local(local, mesh, [Replicate()])
        results.append((t, t.redistribute(placements=[Shard(0)]), t.to_local()))
    for s, f in zip(*results, strict=True):
        same(f, s, "outside the mesh")
    assert results[1][0]._local_tensor.numel() == (12 if rank == 0 else 0)


@pytest.mark.distributed(world_size=2, timeout=60)
def test_call_caches_are_bounded(rank: int, world_size: int) -> None:
    """A program whose layouts change every call does not grow the caches past their limit, and
    results stay right across the emptying."""
    from dtdispatch import _tensor

    limit, _tensor._CACHE_LIMIT = _tensor._CACHE_LIMIT, 3
    try:
        _tensor.clear_call_caches()
        for rows in range(1, 9):
            local = _value((rows, 4))
            s = DTensor.from_local(local, mesh_1d(), [Replicate()]).redistribute(
                placements=[Shard(0)]
            )
            f = FastDTensor.from_local(local, mesh_1d(), [Replicate()]).redistribute(
                placements=[Shard(0)]
            )
            same(f, s, f"{rows} rows")
            assert len(_tensor._from_local_specs) <= 3 and len(_tensor._forward_plans) <= 3
    finally:
        _tensor._CACHE_LIMIT = limit


@pytest.mark.distributed(world_size=2, timeout=60)
def test_from_local_backward_plans_do_not_leak_into_redistribute(
    rank: int, world_size: int
) -> None:
    """from_local's backward redistributes to grad_placements as given (Replicate -> Partial here,
    as in stock); a later redistribute to Partial from the same spec is still refused, as stock
    refuses it."""
    from dtdispatch import _tensor

    _tensor.clear_call_caches()
    mesh = mesh_1d()
    grads = []
    for from_local in (DTensor.from_local, FastDTensor.from_local):
        leaf = _value((4, 3)).requires_grad_()
        t = from_local(leaf, mesh, [Replicate()], grad_placements=[Partial()])
        (t.to_local() * (rank + 1)).sum().backward()
        grads.append(leaf.grad)
    same(grads[1], grads[0], "from_local gradient with grad_placements=[Partial()]")
    errors = []
    for from_local in (DTensor.from_local, FastDTensor.from_local):
        source = from_local(_value((4, 3)), mesh, [Replicate()])
        with pytest.raises(RuntimeError) as raised:  # torch's wording differs from 2.13 to 2.14
            source.redistribute(placements=[Partial()])
        errors.append(str(raised.value))
    assert errors[0] == errors[1] and "Partial" in errors[0], errors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_partitions_and_norm_reductions_skip_torchs_function(
    rank: int, world_size: int, impl: str
) -> None:
    """Replicate -> Partial and Replicate -> a norm's partial are the target placement's own
    partition, and a norm's partial -> Replicate is its transform around the direct all-reduce:
    never torch's ``redistribute_local_tensor``, bitwise (values, layout, identity) as it, in the
    argument redistributions of an addmm's bias and of stacked gradient norms (clipping), on the
    first call and on every hit. Under a dispatch mode torch's function runs them."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._ops._math_ops import _NormPartial
    from torch.distributed.tensor._redistribute import redistribute_local_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from dtdispatch import _collectives, _tensor

    dispatcher.install(impl)
    mesh = mesh_1d()
    local = _value((3, 4)) + rank
    replicate = DTensor.from_local(_value((3, 4)), mesh, (Replicate(),))
    for target in (
        Partial("sum"),
        Partial("avg"),
        Partial("max"),
        Partial("min"),
        _NormPartial(2),
        _NormPartial(3),
        _NormPartial(1.5),
    ):
        spec = DTensorSpec(mesh, (target,), tensor_meta=replicate._spec.tensor_meta)
        for src, dst in ((replicate._spec, spec), (spec, replicate._spec)):
            if type(src.placements[0]) is Partial:
                continue  # Partial -> Replicate: test_direct_collectives_replace_torchs_function
            got = _tensor.redistribute_argument(local, src, dst)
            want = redistribute_local_tensor(local, src, dst)
            assert (got is local) == (want is local), (src, dst)
            same(got, want, f"{src.placements} -> {dst.placements}")

    calls: list[str] = []
    reduced: list[str] = []
    shard = distribute_tensor(_value((4, 6)), mesh, (Shard(0),))
    full = distribute_tensor(_value((4, 6)), mesh, (Replicate(),))
    x = distribute_tensor(_value((4, 6)), mesh, (Shard(1),))
    w = distribute_tensor(_value((6, 5)), mesh, (Shard(0),))
    bias = distribute_tensor(_value((5,)), mesh, (Replicate(),))
    stock = {"shard": shard, "full": full, "x": x, "w": w, "bias": bias}
    fast = {name: dtdispatch.accelerate(t.detach()) for name, t in stock.items()}

    def ops(t: dict[str, DTensor]) -> list[torch.Tensor]:
        norms = [torch.linalg.vector_norm(t[n], p) for n in ("shard", "full") for p in (2.0, 3.0)]
        total = torch.stack(norms[::2])  # Replicate -> _NormPartial(2)
        return [
            total,
            total.full_tensor(),  # _NormPartial(2) -> Replicate
            torch.addmm(t["bias"], t["x"], t["w"]),  # bias: Replicate -> Partial
            torch.stack(norms[1::2]).redistribute(mesh, (Replicate(),)),  # _NormPartial(3)
        ]

    with ExitStack() as stack:
        stack.enter_context(
            _recording(_tensor, "redistribute_local_tensor", lambda *a, **_: calls.append(str(a)))
        )
        stack.enter_context(
            _recording(_collectives, "all_reduce_sum", lambda *_, **__: reduced.append("sum"))
        )
        for _ in range(3):
            for got, want in zip(ops(fast), ops(stock), strict=True):
                same(got, want, "ops")
        assert calls == [], calls
        assert len(reduced) == 2 * 3, reduced  # the two norm reductions
        with CommDebugMode():
            for got, want in zip(ops(fast), ops(stock), strict=True):
                same(got, want, "under CommDebugMode")
        assert calls, "under a dispatch mode the partitions took dtdispatch's own path"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.distributed(world_size=2, timeout=120)
def test_a_dispatch_mode_sees_the_ops_of_stocks_local_chunk(
    rank: int, world_size: int, impl: str
) -> None:
    """Replicate -> Shard is a local chunk: under a dispatch mode the mode sees the ops stock runs
    (torch's split and clone), and gets the same values, on every call; with no mode active the
    chunk never calls torch's function."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dtdispatch import _tensor

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    dispatcher.install(impl)
    mesh = mesh_1d()
    calls: list[str] = []
    for shape, dim in (((4, 3), 0), ((5, 3), 0), ((4, 3), 1)):  # even, uneven, the last dim
        stock = distribute_tensor(_value(shape), mesh, (Replicate(),))
        fast = dtdispatch.accelerate(stock.detach())
        for _ in range(2):  # the call that makes the plan and a call that replays it
            with Log() as want_log:
                want = stock.redistribute(mesh, (Shard(dim),))
            with Log() as got_log:
                got = fast.redistribute(mesh, (Shard(dim),))
            assert got_log.ops == want_log.ops, (shape, dim, got_log.ops, want_log.ops)
            same(got, want, f"{shape} -> Shard({dim}) under a dispatch mode")
        with _recording(_tensor, "redistribute_local_tensor", lambda *_, **__: calls.append("")):
            want = stock.redistribute(mesh, (Shard(dim),))
            same(fast.redistribute(mesh, (Shard(dim),)), want, f"{shape} -> Shard({dim})")
    assert calls == [], "with no mode active the chunk took torch's function"
