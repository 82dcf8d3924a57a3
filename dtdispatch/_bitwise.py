"""Bitwise equality of tensors: the one comparison every plan-time check uses.

A plan is verified once, on the call that made it, and then trusted for every later call with its
key (ARCHITECTURE 'The paths a call can take'). The comparison that verifies it must therefore
never call two tensors equal that a reader could tell apart, and must never raise on a tensor torch
itself accepts: conjugate and negative views (which refuse ``view(dtype)``), complex, bfloat16,
bool and integer dtypes, expanded (stride-0) and empty tensors, meta tensors.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = ["comparable", "same_bits"]


def comparable(t: torch.Tensor) -> bool:
    """Whether ``t``'s element values can be read for a bitwise comparison: a strided,
    non-quantized tensor with real data (not on the meta device, not a fake or efficient-zero
    tensor).

    NOTE: a meta tensor has shape, stride and dtype but no values, so no comparison can show that a
    plan reproduces stock's values; and a DTensor's spec (the cache key) does not say whether its
    local tensor is on meta, so a plan verified on meta would be trusted for the same layout once
    the module is materialized. Callers refuse to cache what they cannot compare.
    """
    return (
        t.layout == torch.strided
        and not t.is_quantized
        and t.device.type != "meta"
        and not t._is_zerotensor()
        and not is_fake(t)
    )


def _physical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its conjugate and negative bits cleared: a view of the same memory holding the
    bits actually stored (no arithmetic, so every bit is kept)."""
    if t.is_conj():
        t = t.conj()  # conj of a conj view: the bit cleared, same memory
    if t.is_neg():
        t = torch._neg_view(t)  # likewise for the negative bit
    return t


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The stored bytes of ``t``'s elements in row-major order, as a fresh uint8 tensor."""
    # NOTE: always a fresh row-major copy: reshape(-1) or contiguous() keep a stride of 0 for an
    # expanded one-element tensor (a backward's expanded ones), and view(uint8) refuses it.
    flat = t.reshape(-1).clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True exactly when nothing about ``a`` and ``b`` that an op reads tells them apart: dtype,
    shape, stride, device, layout, the conjugate and negative bits, and every element's bits
    (NaN payloads and the sign of zero included: no arithmetic comparison is made).

    Both bits being equal, the stored elements are compared, which is the same as comparing the
    resolved values (resolving is a bijection) without computing anything. Storage offset, storage
    identity, tensor type and ``requires_grad`` are left to the caller.

    False whenever either tensor is not ``comparable`` (meta, fake ...): "not shown equal", so the
    caller refuses the shortcut or plan it was verifying, which is always safe.
    """
    if (
        a.dtype != b.dtype
        or a.shape != b.shape
        or a.layout != b.layout
        or a.device != b.device
        or not comparable(a)
        or not comparable(b)
        or a.stride() != b.stride()
        or a.is_conj() != b.is_conj()
        or a.is_neg() != b.is_neg()
    ):
        return False
    if a.numel() == 0:
        return True
    with torch.no_grad():
        return torch.equal(_bytes(_physical(a.detach())), _bytes(_physical(b.detach())))
