"""``Partial``'s hash, the same in every process (ARCHITECTURE "Where dtdispatch differs from stock
on purpose").

torch hashes a ``Partial`` by its ``reduce_op`` string, and Python seeds string hashes per process
(``PYTHONHASHSEED``), so the ranks of one job iterate a set of placements in different orders.
Some of torch's sharding strategies are built from such sets (a decomposed op's candidate
placements, single-dim strategies) and break cost ties by that order: the ranks can choose
different strategies for one op, hence different collectives (a deadlock, or wrong values where
the collectives happen to line up). With a seed-independent hash every rank iterates in one order,
and the strategy chosen is the one stock chooses under some seed.
"""

from __future__ import annotations

import zlib

from torch.distributed.tensor import Partial

__all__ = ["install"]

_SEEDED = Partial.__hash__

_STABLE: dict[str, int] = {}
"""reduce_op -> its CRC-32 (a handful of names; filled on first use, protected by the GIL)."""


def _stable_hash(self: Partial) -> int:
    """Partial's hash with the reduce_op string's CRC-32 for Python's seeded ``hash(str)``."""
    reduce_op = self.reduce_op
    if type(reduce_op) is not str:
        return _SEEDED(self)
    value = _STABLE.get(reduce_op)
    if value is None:
        value = _STABLE[reduce_op] = zlib.crc32(reduce_op.encode())
    return 1 + value


def install() -> None:
    """Give ``Partial``, and the placements that inherit its hash, ``_stable_hash``; nothing where
    torch's hash is not ``1 + hash(reduce_op)`` (another release's, or already installed).
    Equality is unchanged, so every dict and set holds what it held."""
    # NOTE: the subclasses that define their own hash keep it: _NormPartial's hashes a float (not
    # seeded); _MaskPartial's hashes its mask buffer's id, which differs between ranks anyway.
    if Partial.__hash__ is _SEEDED and hash(Partial("sum")) == 1 + hash("sum"):
        Partial.__hash__ = _stable_hash  # type: ignore[method-assign]
