"""Suite-wide pytest set-up: pytester for the harness self-tests, and the dtdispatch plugin when
it is not installed (an installed dtdispatch registers it through its pytest11 entry point, and
registering it twice is an error)."""

import os
from importlib.metadata import entry_points


def _entry_point_active() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "dtdispatch.testing.plugin" for ep in entry_points(group="pytest11"))


pytest_plugins = ["pytester"]
if not _entry_point_active():
    pytest_plugins.append("dtdispatch.testing.plugin")
