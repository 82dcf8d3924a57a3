"""Type stub of the C hot path ``dtdispatch._native._dispatch`` (``_dispatch.c``).

Same signatures and semantics as the Python twin, ``dtdispatch._native.dispatch`` (which
``build_key`` comes from via ``dtdispatch.cache.build_key``).
"""

from typing import Any

from torch._ops import OpOverload

def configure(config: dict[str, Any]) -> None:
    """Hand over what the hot path needs (``_native.dispatch.configure``): ``slow_path``,
    ``custom_ops``, ``dtensor_type``, ``tensor_type``, ``fast_type``, ``new``, ``thread_cache``,
    ``unsafe_set``, ``explicit_local``, ``torch_function_mode_enabled``. Later calls update the keys
    they name."""

def build_key(
    op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[object, ...] | None:
    """The plan-cache key of one call: equal (``==``, same hash) to ``cache.build_key``'s."""

def dispatch(
    cls: type,
    func: OpOverload,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``FastDTensor.__torch_dispatch__``, installed as ``classmethod(dispatch)``: see
    ``_native.dispatch.dispatch``."""
