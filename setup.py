"""Builds the Cython twins of the hot-path modules.

Each compiled module is the very same Python source as its pure twin: ext/ holds a
symlink to the source beside a .pxd that gives Cython the types (Cython's
"augmenting .pxd" pure-Python mode). One source, two builds, no drift.
Set BACKHAUL_NO_EXT=1 to install without compiling (the pure twin is then used,
and BACKHAUL_REQUIRE_EXT=1 would refuse to import).
"""

import os
from pathlib import Path

from setuptools import Extension, setup

EXT_ROOT = Path("ext")


def extensions():
    if os.environ.get("BACKHAUL_NO_EXT") == "1":
        return []
    from Cython.Build import cythonize

    modules = []
    for source in sorted(EXT_ROOT.rglob("*.py")):
        dotted = ".".join(source.relative_to(EXT_ROOT).with_suffix("").parts)
        modules.append(Extension(dotted, [str(source)], extra_compile_args=["-O2"]))
    return cythonize(
        modules,
        include_path=[str(EXT_ROOT)],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "binding": False,
        },
    )


setup(ext_modules=extensions())
