"""Type stub of the C hot path above dispatch ``dtdispatch._native._function`` (``_function.c``).

Same signatures and semantics as the Python twin, ``dtdispatch._native.function``.
"""

from typing import Any

def configure(config: dict[str, Any]) -> None:
    """Hand over what the hot path needs (``_native.function.configure``)."""

def build_key(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad: bool,
    inference: bool,
    default_dtype: Any,
    autocast: Any,
) -> tuple[list[object] | str, list[int]]:
    """The flat key of one call and its scalar positions, or (reason, []): see
    ``_native.function.build_key``."""

def torch_function(
    cls: type,
    func: Any,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``FastDTensor.__torch_function__``, installed as ``classmethod(torch_function)``."""
