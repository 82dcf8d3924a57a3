"""The test oracles' view of a tensor's values: its bytes, independent of the library's own
comparison helper (``dtdispatch._bitwise``), so the code under test is never its own oracle."""

from __future__ import annotations

import torch

__all__ = ["bits"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a fresh row-major copy of ``t``'s values (empty: the empty copy).

    NOTE: a fresh copy, not ``contiguous()``: a tensor torch calls contiguous may keep an odd stride
    on a size-1 dim, which ``view(uint8)`` refuses; the copy also resolves conjugate and negative
    bits (compare those separately)."""
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()).reshape(-1)
    return flat.view(torch.uint8) if t.numel() else flat
