"""The OpInfo conformance checker's comparison (``dtdispatch.testing.opinfo.compare``) on plain
values: what counts as a difference from stock."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.placement_types import _MaskPartial

from dtdispatch.testing._bits import placement_fields
from dtdispatch.testing.opinfo import Mismatch, compare, shardings


def test_bitwise_not_numeric() -> None:
    compare(torch.tensor([0.0, float("nan")]), torch.tensor([0.0, float("nan")]), "x")
    with pytest.raises(Mismatch, match="local bytes"):
        compare(torch.tensor([0.0]), torch.tensor([-0.0]), "x")
    with pytest.raises(Mismatch, match="stride"):
        compare(torch.ones(2, 3), torch.ones(3, 2).t(), "x")


def test_conj_bit_and_scalars() -> None:
    z = torch.tensor([1 + 2j])
    with pytest.raises(Mismatch, match="conj bit"):
        compare(z.conj(), z.conj().resolve_conj(), "x")
    compare(z.conj(), z.clone().conj(), "x")
    compare(float("nan"), float("nan"), "x")
    with pytest.raises(Mismatch):
        compare(1, 1.0, "x")  # same value, other type
    with pytest.raises(Mismatch, match="structure"):
        compare((torch.ones(1),), [torch.ones(1)], "x")


def test_mask_partial_by_value() -> None:
    a, b = _MaskPartial(offset_shape=torch.Size([4, 2]), offset_dim=0), _MaskPartial(
        offset_shape=torch.Size([4, 2]), offset_dim=0)
    assert a != b  # torch compares the buffers by identity
    assert placement_fields(a) == placement_fields(b)
    a.mask_buffer.materialize_mask(torch.tensor([True, False]))
    assert placement_fields(a) != placement_fields(b)
    b.mask_buffer.materialize_mask(torch.tensor([True, False]))
    assert placement_fields(a) == placement_fields(b)


def test_shardings_like_torch_converter() -> None:
    # Replicate first; each tensor on each evenly divisible dim; bool and 0-d only Replicate.
    got = shardings([torch.ones(4, 3), torch.ones(2, dtype=torch.bool), torch.ones(())], 2, 10)
    assert [tuple(str(p) for p in s) for s in got] == [("R", "R", "R"), ("S(0)", "R", "R")]
    assert len(shardings([torch.ones(4, 4), torch.ones(4)], 2, 10)) == 5
    assert len(shardings([torch.ones(4, 4), torch.ones(4)], 2, 2)) == 2
