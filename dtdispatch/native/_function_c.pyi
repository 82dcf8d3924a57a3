"""Type stub of the C hot path above dispatch ``dtdispatch.native._function_c`` (``_function.c``).

Same signatures and semantics as the Python twin, ``dtdispatch.native._function``.
"""

from typing import Any

def configure(config: dict[str, Any]) -> None:
    """Hand over what the hot path needs (``_function.configure``)."""

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
    ``_function.build_key``."""

def torch_function(
    cls: type,
    func: Any,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``FastDTensor.__torch_function__``, installed as ``classmethod(torch_function)``."""
