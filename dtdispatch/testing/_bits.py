"""The test oracles' view of a tensor's values (its bytes) and of a placement, independent of the
library's own comparison helper (``dtdispatch._bitwise``), so the code under test is never its own
oracle."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor.placement_types import Placement, _MaskPartial

__all__ = ["bits", "placement_fields"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a fresh row-major copy of ``t``'s values (empty: the empty copy).

    NOTE: a fresh copy, not ``contiguous()``: a tensor torch calls contiguous may keep an odd stride
    on a size-1 dim, which ``view(uint8)`` refuses; the copy also resolves conjugate and negative
    bits (compare those separately)."""
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()).reshape(-1)
    return flat.view(torch.uint8) if t.numel() else flat


def placement_fields(p: Placement) -> tuple[Any, ...]:
    """A placement as comparable values.

    NOTE: a ``_MaskPartial`` compares its mask buffer by identity; stock and dtdispatch each make
    their own, so its mask is compared by value here."""
    if isinstance(p, _MaskPartial):
        data = p.mask_buffer.data
        mask = None if data is None else (tuple(data.shape), tuple(bits(data).tolist()))
        return (type(p), p.reduce_op, p.offset_shape, p.offset_dim, mask)
    return (type(p), p)
