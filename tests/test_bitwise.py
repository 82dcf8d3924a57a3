"""``dtdispatch._bitwise``: the one bitwise comparison every plan-time check uses (single process).

Expected answers are built from raw bits (integer views of plain tensors), never from the helper.
"""

from __future__ import annotations

import pytest
import torch

from dtdispatch import _above as above
from dtdispatch import local_results
from dtdispatch._bitwise import comparable, same_bits

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(
            dtype
        )
    return torch.randn(shape, generator=gen, dtype=dtype)


def _flip_one_bit(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the lowest bit of its last stored byte flipped."""
    out = t.clone()
    raw = out.view(torch.uint8).reshape(-1)
    raw[-1] ^= 1
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_copies_and_one_bit_apart(dtype: torch.dtype) -> None:
    t = _sample(dtype)
    assert same_bits(t, t.clone())
    assert same_bits(t[0], t.clone()[0])  # 1-D views at an offset
    assert same_bits(t[1, 2], t.clone()[1, 2])  # 0-d
    if dtype == torch.bool:
        other = t.clone()
        other[-1, -1] = not bool(t[-1, -1])
    else:
        other = _flip_one_bit(t)
    assert not same_bits(t, other)


def test_nan_payloads_and_signed_zero_are_bits() -> None:
    quiet = torch.tensor([0x7FC00000], dtype=torch.int32).view(torch.float32)
    payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(quiet).all() and torch.isnan(payload).all()
    assert same_bits(quiet, quiet.clone())  # torch.equal says NaN != NaN
    assert not same_bits(quiet, payload)
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # == says they are equal
    bf = torch.tensor([0.0, -0.0], dtype=torch.bfloat16)
    assert not same_bits(bf[:1], bf[1:])


def test_conj_views_compare_flags_and_values_without_raising() -> None:
    x = _sample(torch.complex64)
    c = x.conj()
    assert c.is_conj()
    with pytest.raises(RuntimeError, match="conjugate"):
        c.view(torch.uint8)  # what the old comparison did
    assert same_bits(c, x.clone().conj())
    # Same values, one resolved: an op reading the bit (view(dtype), is_conj()) tells them apart.
    resolved = c.resolve_conj()
    assert torch.equal(resolved, c)
    assert not same_bits(c, resolved)
    assert not same_bits(c, _flip_one_bit(x).conj())
    # Real tensors: conj() is the identity (no bit).
    r = _sample(torch.float32)
    assert same_bits(r.conj(), r.clone())


def test_neg_views() -> None:
    x = _sample(torch.complex128)
    imag = x.conj().imag  # a negative view of x's imaginary parts
    assert imag.is_neg()
    assert same_bits(imag, x.clone().conj().imag)
    assert not same_bits(imag, imag.resolve_neg())
    n = torch._neg_view(x.conj())
    assert n.is_neg() and n.is_conj()
    assert same_bits(n, torch._neg_view(x.clone().conj()))
    assert not same_bits(n, n.resolve_neg())


def test_expanded_and_empty_tensors() -> None:
    one = torch.ones(())
    assert same_bits(one.expand(1, 1), one.clone().expand(1, 1))  # stride (0, 0), one element
    assert same_bits(one.expand(3, 2), torch.ones(()).expand(3, 2))
    assert not same_bits(one.expand(3), torch.ones(3))  # same values, another stride
    assert not same_bits(torch.tensor(2.0).expand(3), one.expand(3))
    assert same_bits(torch.empty(0, 3), torch.empty(0, 3))
    assert not same_bits(torch.empty(0, 3), torch.empty(3, 0))
    assert not same_bits(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.float64))


def test_metadata_differences() -> None:
    t = _sample(torch.float32, (4, 4))
    assert not same_bits(t, t.t().contiguous().t())  # same values, other stride
    assert not same_bits(t, t.double())
    assert not same_bits(t, t.reshape(16))
    assert not same_bits(t.to(torch.int32), t.to(torch.int64))
    g = t.clone().requires_grad_()
    assert same_bits(g, t)  # requires_grad is the caller's, and must not raise


def test_meta_and_other_unreadable_tensors_are_never_equal() -> None:
    m = torch.empty(3, 4, device="meta")
    assert not comparable(m)
    assert not same_bits(m, m)  # not shown equal: the caller refuses to cache
    assert not same_bits(torch.empty(0, device="meta"), torch.empty(0, device="meta"))
    assert not same_bits(m, torch.zeros(3, 4))
    z = torch._efficientzerotensor(3)
    assert not comparable(z) and not same_bits(z, torch.zeros(3))
    assert comparable(torch.zeros(3))
    assert not comparable(torch.zeros(3).to_sparse())


def test_call_sites_use_it() -> None:
    # The executor's output comparison and the exact clone of the path above dispatch.
    x = _sample(torch.complex64)
    assert local_results._same_output(x.conj(), x.clone().conj(), view=False)
    assert not local_results._same_output(x.conj(), x.conj().resolve_conj(), view=False)
    for t in (x.conj(), x.conj().imag, torch._neg_view(x.conj()), x.t()):
        clone = above._exact_clone(t)
        assert clone.data_ptr() != t.data_ptr()
        assert same_bits(clone, t), t
