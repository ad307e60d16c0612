"""Picking a hot-path module's Cython build or its pure-Python twin.

Both builds come from one source (Cython's pure-Python mode: ``ext/`` holds a symlink to
the source beside an augmenting ``.pxd``; setup.py compiles it) and behave identically.
BACKHAUL_PURE=1 selects the twin on purpose; BACKHAUL_REQUIRE_EXT=1 refuses to run without
the compiled build instead of falling back to the twin (CI and production set it).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType


def pick(compiled: str, pure: str, what: str) -> tuple[ModuleType, str]:
    """(module, "cython" | "python"): the compiled module ``compiled`` or its twin ``pure``."""
    if os.environ.get("BACKHAUL_PURE") == "1":
        return importlib.import_module(pure), "python"
    try:
        # import_module, not `from ... import`: it honours a None placeholder in sys.modules.
        return importlib.import_module(compiled), "cython"
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            raise ImportError(
                f"the compiled {what} {compiled} is missing or broken ({exc}) and "
                "BACKHAUL_REQUIRE_EXT=1 forbids the slow pure-Python twin; build it with "
                "tools/bootstrap.sh or `pip install -e .` (Cython and a C compiler needed)"
            ) from exc
        warnings.warn(
            f"backhaul: the compiled {what} could not be imported ({exc}); using the slow "
            "pure-Python twin. Run tools/bootstrap.sh or `pip install -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return importlib.import_module(pure), "python"
