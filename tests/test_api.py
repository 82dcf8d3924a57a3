"""The shape of the public API: what ``native_status()`` returns."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dtdispatch
from dtdispatch import _dispatcher as dispatcher
from dtdispatch import _native as native


@pytest.fixture
def default_install() -> Iterator[None]:
    yield
    dispatcher.install(native.DEFAULT)


@pytest.mark.parametrize("impl", sorted(native.implementations()))
@pytest.mark.parametrize("above", [True, False], ids=["above", "below-only"])
def test_native_status_is_a_two_field_named_tuple(
    default_install: None, impl: str, above: bool
) -> None:
    dispatcher.install(impl, above=above)
    status = dtdispatch.native_status()
    assert isinstance(status, dtdispatch.NativeStatus)
    assert isinstance(status, tuple) and len(status) == 2
    assert dtdispatch.NativeStatus._fields == ("active", "reason")
    active, why = status  # unpacks as a plain pair
    assert active is status.active and why is status.reason
    assert type(active) is bool and type(why) is str and why
    # The C extension is active exactly when it was installed.
    assert active is (impl == "native")
    if impl == "python" and native.DEFAULT == "native":
        assert why.startswith("Python twin selected")
    assert ("above dispatch: off" in why) is (not above)
