"""The native hot paths: each C extension when it is built and allowed, else its Python twin
(CPython style: ``dispatch`` is the twin of ``_dispatch``, ``function`` of ``_function``).

``dispatch``/``_dispatch`` expose ``configure``, ``build_key`` and ``dispatch`` with the same
signatures. ``DTDISPATCH_NATIVE=0`` selects the twin. ``DTDISPATCH_REQUIRE_NATIVE=1`` (CI) turns a
missing or broken extension into an import error instead of a silent slowdown.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from dtdispatch._native import dispatch, function

__all__ = ["DEFAULT", "FUNCTION_REASON", "REASON", "function_implementations", "implementations"]

_log = logging.getLogger("dtdispatch")

_dispatch: ModuleType | None
try:
    _dispatch = importlib.import_module("dtdispatch._native._dispatch")

    _import_error = ""
except ImportError as exc:
    _dispatch = None
    _import_error = str(exc)
    if os.environ.get("DTDISPATCH_REQUIRE_NATIVE") == "1":
        raise ImportError(
            f"DTDISPATCH_REQUIRE_NATIVE=1 but the C extension did not import: {exc}"
        ) from exc

if os.environ.get("DTDISPATCH_NATIVE", "1") == "0":
    DEFAULT, REASON = "python", "disabled by DTDISPATCH_NATIVE=0"
elif _dispatch is None:
    DEFAULT, REASON = (
        "python",
        f"C extension not importable ({_import_error}); using the Python twin",
    )
else:
    DEFAULT, REASON = "native", "C extension dtdispatch._native._dispatch loaded"

if DEFAULT != "native":
    _log.warning("dtdispatch native path inactive: %s", REASON)

# The path above dispatch (FastDTensor.__torch_function__): its own extension, same switches.
_function: ModuleType | None
try:
    _function = importlib.import_module("dtdispatch._native._function")
    FUNCTION_REASON = "C extension dtdispatch._native._function loaded"
except ImportError as exc:
    _function = None
    FUNCTION_REASON = f"C extension not importable ({exc}); using the Python twin"
    if os.environ.get("DTDISPATCH_REQUIRE_NATIVE") == "1":
        raise ImportError(
            f"DTDISPATCH_REQUIRE_NATIVE=1 but the C extension did not import: {exc}"
        ) from exc
    if DEFAULT == "native":
        _log.warning("dtdispatch native path above dispatch inactive: %s", FUNCTION_REASON)


def implementations() -> dict[str, ModuleType]:
    """The importable implementations by name: always "python", and "native" when the extension
    loaded."""
    found = {"python": dispatch}
    if _dispatch is not None:
        found["native"] = _dispatch
    return found


def function_implementations() -> dict[str, ModuleType]:
    """The path above dispatch by implementation name: always "python" (``function``), and
    "native" when ``_function`` loaded."""
    found = {"python": function}
    if _function is not None:
        found["native"] = _function
    return found
