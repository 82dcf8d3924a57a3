"""Partial placements' hashes, the same in every process (ARCHITECTURE "Where dtdispatch differs
from stock on purpose").

torch hashes a ``Partial`` by its ``reduce_op`` string, which Python seeds per process
(``PYTHONHASHSEED``), and a ``_MaskPartial`` by its mask buffer's ``id`` as well, an address: the
ranks of one job iterate a set of placements in different orders. Some of torch's sharding
strategies are built from such sets (a decomposed op's candidate placements, single-dim
strategies) and break cost ties by that order, so the ranks can choose different strategies for
one op, hence different collectives (a deadlock, or wrong values where the collectives happen to
line up). With hashes that are the same in every process every rank iterates in one order, and the
strategy chosen is one stock chooses under some seed.
"""

from __future__ import annotations

import zlib

from torch.distributed.tensor import Partial
from torch.distributed.tensor.placement_types import _MaskPartial

__all__ = ["install"]

_SEEDED = Partial.__hash__
_SEEDED_MASK = _MaskPartial.__hash__

_STABLE: dict[str, int] = {}
"""reduce_op -> its CRC-32 (a handful of names; filled on first use, protected by the GIL)."""


def _stable(reduce_op: object) -> int:
    """``hash(reduce_op)``, with a string's CRC-32 for Python's seeded string hash."""
    if type(reduce_op) is not str:
        return hash(reduce_op)
    value = _STABLE.get(reduce_op)
    if value is None:
        value = _STABLE[reduce_op] = zlib.crc32(reduce_op.encode())
    return value


def _stable_hash(self: Partial) -> int:
    """``Partial.__hash__`` (``1 + hash(reduce_op)``) with ``_stable(reduce_op)``."""
    return 1 + _stable(self.reduce_op)


def _stable_mask_hash(self: _MaskPartial) -> int:
    """``_MaskPartial.__hash__`` without the mask buffer's id: equal placements still hash alike
    (equality also asks for the same buffer object, so placements with different buffers merely
    share a hash)."""
    return 1 + hash((_stable(self.reduce_op), self.offset_shape, self.offset_dim))


def install() -> None:
    """Give ``Partial`` (and the placements that inherit its hash) ``_stable_hash`` and
    ``_MaskPartial`` ``_stable_mask_hash``; each only where torch's hash is the one these replace
    (not another release's, not already installed). Equality is unchanged, so every dict and set
    holds what it held."""
    # NOTE: _NormPartial defines its own hash, of a float: not seeded, kept.
    if Partial.__hash__ is _SEEDED and hash(Partial("sum")) == 1 + hash("sum"):
        Partial.__hash__ = _stable_hash  # type: ignore[method-assign]
    mask = _MaskPartial(reduce_op="sum", offset_shape=None, offset_dim=0)  # type: ignore[no-untyped-call]
    seeded_mask = 1 + hash(("sum", None, 0, id(mask.mask_buffer)))
    if _MaskPartial.__hash__ is _SEEDED_MASK and hash(mask) == seeded_mask:
        _MaskPartial.__hash__ = _stable_mask_hash  # type: ignore[method-assign]
