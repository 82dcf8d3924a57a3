"""The native hot path: the C extension ``_speedups`` when it is built and allowed, else its Python
twin.

Both expose ``configure``, ``build_key`` and ``dispatch`` with the same signatures.
``DTDISPATCH_NATIVE=0`` selects the twin. ``DTDISPATCH_REQUIRE_NATIVE=1`` (CI) turns a missing or
broken extension into an import error instead of a silent slowdown.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from dtdispatch.native import _function, _native

__all__ = ["DEFAULT", "FUNCTION_REASON", "REASON", "function_implementations", "implementations"]

_log = logging.getLogger("dtdispatch")

_speedups: ModuleType | None
try:
    _speedups = importlib.import_module("dtdispatch.native._speedups")

    _import_error = ""
except ImportError as exc:
    _speedups = None
    _import_error = str(exc)
    if os.environ.get("DTDISPATCH_REQUIRE_NATIVE") == "1":
        raise ImportError(
            f"DTDISPATCH_REQUIRE_NATIVE=1 but the C extension did not import: {exc}"
        ) from exc

if os.environ.get("DTDISPATCH_NATIVE", "1") == "0":
    DEFAULT, REASON = "python", "disabled by DTDISPATCH_NATIVE=0"
elif _speedups is None:
    DEFAULT, REASON = (
        "python",
        f"C extension not importable ({_import_error}); using the Python twin",
    )
else:
    DEFAULT, REASON = "native", "C extension dtdispatch.native._speedups loaded"

if DEFAULT != "native":
    _log.warning("dtdispatch native path inactive: %s", REASON)

# The path above dispatch (FastDTensor.__torch_function__): its own extension, same switches.
_function_c: ModuleType | None
try:
    _function_c = importlib.import_module("dtdispatch.native._function_c")
    FUNCTION_REASON = "C extension dtdispatch.native._function_c loaded"
except ImportError as exc:
    _function_c = None
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
    found = {"python": _native}
    if _speedups is not None:
        found["native"] = _speedups
    return found


def function_implementations() -> dict[str, ModuleType]:
    """The path above dispatch by implementation name: always "python" (``_function``), and
    "native" when ``_function_c`` loaded."""
    found = {"python": _function}
    if _function_c is not None:
        found["native"] = _function_c
    return found
