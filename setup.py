"""Build script: the Python package and its two C extensions (dtdispatch/_native, built with gcc and
Python.h only, no torch headers).

``DTDISPATCH_REQUIRE_NATIVE=1`` (set by .ci/run) makes a failed extension build fatal; without
it the extension is optional and dtdispatch falls back to its Python twin (and says so at import).
"""

import os

from setuptools import Extension, setup

REQUIRE_NATIVE = os.environ.get("DTDISPATCH_REQUIRE_NATIVE") == "1"

# Each native Extension must be declared with optional=not REQUIRE_NATIVE.
ext_modules: list[Extension] = [
    Extension(
        "dtdispatch._native._dispatch",
        ["dtdispatch/_native/_dispatch.c"],
        depends=["dtdispatch/_native/_pycompat.h"],
        optional=not REQUIRE_NATIVE,
        extra_compile_args=["-Wall", "-Wextra", "-O2"],
    ),
    # The path above dispatch (FastDTensor.__torch_function__), its own module so it builds and
    # fails independently.
    Extension(
        "dtdispatch._native._function",
        ["dtdispatch/_native/_function.c"],
        depends=["dtdispatch/_native/_pycompat.h"],
        optional=not REQUIRE_NATIVE,
        extra_compile_args=["-Wall", "-Wextra", "-O2"],
    ),
]

setup(ext_modules=ext_modules)
