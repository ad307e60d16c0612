"""Fixtures shared by the unit tests."""

from __future__ import annotations

import importlib
import os

import pytest


def _load_codec(name: str):
    module = f"backhaul.protocol.{name}"
    if name == "_framing_py":
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            pytest.fail(f"the Cython codec is required (BACKHAUL_REQUIRE_EXT=1) but does not import: {exc}")
        pytest.skip(f"Cython codec not built ({exc}); run tools/bootstrap.sh")


@pytest.fixture(params=["_framing_py", "_framing_c"], ids=["python", "cython"])
def codec(request):
    """Each frame codec build in turn: the pure twin and the Cython extension."""
    return _load_codec(request.param)


@pytest.fixture
def both_codecs():
    """(pure twin, Cython build) for differential tests."""
    return _load_codec("_framing_py"), _load_codec("_framing_c")
