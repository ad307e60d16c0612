"""Picks the compiled or the pure-Python twin of a hot-path module.

Each hot-path module is one source, ``<package>/_<name>_py.py``, that runs as plain Python
and that Cython also compiles, in pure-Python mode, as ``<package>/_<name>_c`` (ext/ holds a
symlink to the source beside an augmenting ``.pxd`` with the types; see setup.py). The two
behave identically; the compiled one is only faster. The environment decides, the same way
for every module, so a process never mixes a compiled module with a pure one by accident:

- ``BACKHAUL_PURE=1``: always the pure twin (the suite's second pass runs this way);
- ``BACKHAUL_REQUIRE_EXT=1``: the compiled twin or an ImportError saying how to build it
  (CI and production);
- neither: the compiled twin when it imports, else the pure one with a RuntimeWarning.
"""

from __future__ import annotations

import importlib
import os
import types
import warnings


def load(package: str, name: str, what: str) -> tuple[types.ModuleType, str]:
    """The twin of ``package._name_{c,py}`` to use and which one it is ("cython" or "python").

    ``what`` names the module for a human ("the frame codec") in the warning and the error.
    """
    pure = f"{package}._{name}_py"
    if os.environ.get("BACKHAUL_PURE") == "1":
        return importlib.import_module(pure), "python"
    compiled = f"{package}._{name}_c"
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
