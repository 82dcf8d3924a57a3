"""Complex tensors and conjugate / negative views on real ranks: ``x.conj()``, the backward of a
complex multiply (rotary embeddings through ``view_as_complex``, as torchtitan's Llama3 writes
them) and ``torch.fft`` functions, bitwise equal to stock DTensor on both implementations, the path
above dispatch on and off. Each call runs twice (the plan, then the cached replay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from dtdispatch import FastDTensor

from ._compare import IDS, VARIANTS, outcome, pair, same, same_outcome, variant


def _both(fn: Callable[..., Any], stock_args: list[Any], fast_args: list[Any]) -> None:
    """``fn`` on stock and on FastDTensor arguments: the same result, or the same exception."""
    expected, got = outcome(fn, *stock_args), outcome(fn, *fast_args)
    same_outcome(got, expected)
    if expected[0] == "ok":
        # An argument returned as is on stock (resolve_conj of a plain tensor) is returned as is.
        assert [expected[1] is a for a in stock_args] == [got[1] is a for a in fast_args]


def _complex(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed))


CALLS: dict[str, Callable[..., Any]] = {
    "conj": lambda x: x.conj(),
    "conj is_conj": lambda x: x.conj().is_conj(),
    "conj add": lambda x: x.conj() + 1,
    "conj mul": lambda x: x.conj() * x,
    "conj imag": lambda x: x.conj().imag,
    "conj imag neg": lambda x: x.conj().imag * 2,
    "conj physical": lambda x: torch.conj_physical(x),
    "resolve_conj": lambda x: x.resolve_conj(),
    "resolve_neg": lambda x: x.resolve_neg(),
    "torch.resolve_conj": lambda x: torch.resolve_conj(x),
    "imag resolve_neg": lambda x: x.imag.resolve_neg(),
    "imag add": lambda x: x.imag + 1,
    # Calls that return their argument as is, with either bit.
    "to same": lambda x: x.to(x.dtype),
    "contiguous": lambda x: x.contiguous(),
    "type_as": lambda x: x.type_as(x),
    "cfloat": lambda x: x.cfloat(),
    "imag to same": lambda x: x.imag.to(torch.float32),
    "conj clone": lambda x: x.conj().clone(),
    "view_as_real": lambda x: torch.view_as_real(x),
    "hfft": lambda x: torch.fft.hfft(x),
    "ifft": lambda x: torch.fft.ifft(x),
    "ihfft": lambda x: torch.fft.ihfft(x.real),
    "fft": lambda x: torch.fft.fft(x),
    "rfft": lambda x: torch.fft.rfft(x.real),
}


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_conj_views_and_fft_match_stock(rank: int, world_size: int, impl: str, above: bool) -> None:
    with variant(impl, above):
        value = _complex((4, 6), seed=1)
        for placements in ([Shard(0)], [Replicate()]):
            stock, fast = pair(value, placements)
            for name, fn in CALLS.items():
                # The plan, then the cached replay; a conjugate view has the same spec (the same key
                # below dispatch), so each order of plain and conjugated inputs is tried.
                for conj in (False, False, True, True, False):
                    s, f = (stock.conj(), fast.conj()) if conj else (stock, fast)
                    try:
                        _both(fn, [s], [f])
                    except AssertionError as e:
                        raise AssertionError(f"{name} {placements} conj={conj}: {e}") from e


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_fft_backward_matches_stock(rank: int, world_size: int, impl: str, above: bool) -> None:
    with variant(impl, above):
        value = _complex((4, 6), seed=2)
        for name in ("hfft", "ifft", "ihfft", "conj mul"):
            grads = []
            for _ in range(2):
                stock, fast = pair(value, [Shard(0)], requires_grad=True)
                for x in (stock, fast):
                    out = CALLS[name](x)
                    loss = (out.real if out.is_complex() else out).square().sum()
                    loss.backward()
                grads.append((fast.grad, stock.grad))
                same(fast.grad, stock.grad)
            assert isinstance(grads[1][0], FastDTensor)


def _rotary(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchtitan's Llama3 ``apply_rotary_emb`` (q and k of shape (batch, seq, heads, head_dim))."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[3])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _freqs(seq: int, head_dim: int) -> torch.Tensor:
    """torchtitan's ``precompute_freqs_cis``."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize(("impl", "above"), VARIANTS, ids=IDS)
@pytest.mark.distributed(world_size=2)
def test_rotary_complex_backward_matches_stock(
    rank: int, world_size: int, impl: str, above: bool
) -> None:
    """q/k sharded by heads, the rotary frequencies replicated: forward outputs and the gradients
    (the backward of the complex multiply multiplies by the conjugate) are stock's, twice."""
    with variant(impl, above):
        batch, seq, heads, head_dim = 2, 4, 4, 8
        gen = torch.Generator().manual_seed(3)
        q = torch.randn(batch, seq, heads, head_dim, generator=gen)
        k = torch.randn(batch, seq, heads, head_dim, generator=gen)
        freqs = _freqs(seq, head_dim)
        for _ in range(2):
            sq, fq = pair(q, [Shard(2)], requires_grad=True)
            sk, fk = pair(k, [Shard(2)], requires_grad=True)
            sf, ff = pair(freqs, [Replicate()])
            outs = []
            for xq, xk, f in ((sq, sk, sf), (fq, fk, ff)):
                oq, ok = _rotary(xq, xk, f)
                (oq * ok).sum().backward()
                outs.append((oq, ok))
            same(outs[1][0].detach(), outs[0][0].detach())
            same(outs[1][1].detach(), outs[0][1].detach())
            same(fq.grad, sq.grad)
            same(fk.grad, sk.grad)
