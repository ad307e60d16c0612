"""The compiled and pure twins of the hot-path modules: which one is picked, and that they
cannot drift (the same operations give the same bytes and the same events)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from backhaul import twins
from backhaul.protocol import framing, mux
from backhaul.relay.http import exchange, reader
from backhaul.transport import pipe, tunnel

from .test_mux import SMALL
from backhaul.protocol.constants import ErrorCode, Role
from backhaul.protocol.errors import SessionError

#: Every module built twice (package, name): backhaul.twins picks between _<name>_c and _<name>_py.
TWINS = [
    ("backhaul.protocol", "framing"),
    ("backhaul.protocol", "mux"),
    ("backhaul.transport", "tunnel"),
    ("backhaul.transport", "pipe"),
    ("backhaul.relay.http", "reader"),
    ("backhaul.relay.http", "exchange"),
]
IDS = [name for _, name in TWINS]


@pytest.fixture(autouse=True)
def _forget_what_the_test_imported():
    """A module first imported under a test's environment would keep that pick for every later
    test of the process: drop what the test imported."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("backhaul."):
            del sys.modules[name]


def _env(monkeypatch, **values):
    for key in ("BACKHAUL_PURE", "BACKHAUL_REQUIRE_EXT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("package, name", TWINS, ids=IDS)
def test_backhaul_pure_picks_the_pure_twin(monkeypatch, package, name):
    _env(monkeypatch, BACKHAUL_PURE="1")
    module, which = twins.load(package, name, name)
    assert which == "python" and module.__name__ == f"{package}._{name}_py"
    assert not module.__file__.endswith(".so")


@pytest.mark.parametrize("package, name", TWINS, ids=IDS)
def test_require_ext_picks_the_compiled_twin(monkeypatch, package, name):
    _env(monkeypatch, BACKHAUL_REQUIRE_EXT="1")
    try:
        module, which = twins.load(package, name, name)
    except ImportError as exc:
        if os.environ.get("BACKHAUL_PURE") == "1":
            pytest.skip(f"extensions not required in this pass ({exc})")
        raise
    assert which == "cython" and module.__file__.endswith(".so")


@pytest.mark.parametrize("package, name", TWINS, ids=IDS)
def test_a_missing_extension_is_an_error_under_require_ext(monkeypatch, package, name):
    monkeypatch.setitem(sys.modules, f"{package}._{name}_c", None)
    _env(monkeypatch, BACKHAUL_REQUIRE_EXT="1")
    with pytest.raises(ImportError, match="BACKHAUL_REQUIRE_EXT=1 forbids"):
        twins.load(package, name, name)


@pytest.mark.parametrize("package, name", TWINS, ids=IDS)
def test_a_missing_extension_falls_back_loudly(monkeypatch, package, name):
    monkeypatch.setitem(sys.modules, f"{package}._{name}_c", None)
    _env(monkeypatch)
    with pytest.warns(RuntimeWarning, match="slow pure-Python twin"):
        module, which = twins.load(package, name, name)
    assert which == "python"


def test_the_pickers_agree_with_the_environment():
    want = "python" if os.environ.get("BACKHAUL_PURE") == "1" else "cython"
    if os.environ.get("BACKHAUL_PURE") != "1" and os.environ.get("BACKHAUL_REQUIRE_EXT") != "1":
        pytest.skip("neither BACKHAUL_PURE nor BACKHAUL_REQUIRE_EXT: either build may be in use")
    modules = (framing, mux, tunnel, pipe, reader, exchange)
    assert {m.IMPLEMENTATION for m in modules} == {want}


# ---------------------------------------------------------------------------- no drift


def _sessions():
    pure = importlib.import_module("backhaul.protocol._mux_py")
    try:
        compiled = importlib.import_module("backhaul.protocol._mux_c")
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            raise
        pytest.skip(f"the compiled mux is not built ({exc})")
    return pure.Session, compiled.Session


#: test_mux's small windows, with few streams so that scripts reach the stream limit.
FLOW = dataclasses.replace(SMALL, max_streams=4)

#: One step of a script: who acts, what it does, a size or index.
STEP = st.tuples(
    st.sampled_from(["relay", "connector"]),
    st.sampled_from(["open", "accept", "send", "send_end", "end", "reset", "consume", "ping", "control", "deliver"]),
    st.integers(min_value=0, max_value=70_000),
)


def _run(session_class, script, chunk: int) -> list:
    """Play ``script`` on a relay/connector pair of ``session_class``; everything observable, in order."""
    clock = iter(range(10**6)).__next__  # deterministic, the same for both builds
    sides = {"relay": session_class(Role.RELAY, FLOW, clock=clock), "connector": session_class(Role.CONNECTOR, FLOW, clock=clock)}
    other = {"relay": "connector", "connector": "relay"}
    opened: list[int] = []
    pending: dict[str, list[int]] = {"relay": [], "connector": []}
    trace: list = []

    def deliver(dst_name):
        src, dst = sides[other[dst_name]], sides[dst_name]
        data = bytes(src.data_to_send())
        trace.append((dst_name, "bytes", data))
        for i in range(0, len(data), chunk):
            dst.receive_data(data[i : i + chunk])
            while (event := dst.next_event()) is not None:
                trace.append((dst_name, repr(event)))
                sid = getattr(event, "stream_id", None)
                if type(event).__name__ == "StreamOpened":
                    pending[dst_name].append(sid)
                if type(event).__name__ == "DataReceived":
                    trace.append((dst_name, "consume", sid, len(event.data)))
                    dst.consumed(sid, len(event.data))

    for who, what, n in script:
        session = sides[who]
        try:
            if what == "open" and who == "relay":
                opened.append(session.open_stream({"app": "a", "n": n}))
            elif what == "accept" and pending[who]:
                session.accept_stream(pending[who].pop(0))
            elif what in ("send", "send_end") and opened:
                sid = opened[n % len(opened)]
                trace.append((who, "send", session.send_data(sid, b"d" * (n % 40_000), end=what == "send_end")))
            elif what == "end" and opened:
                session.end_stream(opened[n % len(opened)])
            elif what == "reset" and opened:
                session.reset_stream(opened[n % len(opened)], ErrorCode.CANCEL, "test")
            elif what == "consume" and opened:
                session.consumed(opened[n % len(opened)], n % 1000)
            elif what == "ping":
                session.ping()
            elif what == "control":
                session.send_control({"type": "t", "n": n})
            elif what == "deliver":
                deliver(other[who])
        except SessionError as exc:
            trace.append((who, "refused", str(exc)))
        trace.append((who, "state", session.closed, session.active_streams, session.draining))
    for _ in range(3):
        deliver("relay")
        deliver("connector")
    return trace


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(STEP, max_size=40), chunk=st.sampled_from([1, 7, 4096, 1 << 30]))
def test_the_compiled_session_behaves_as_the_pure_one(script, chunk):
    pure, compiled = _sessions()
    # os.urandom makes PING payloads differ: compare them without it.
    want = _strip_pings(_run(pure, script, chunk))
    got = _strip_pings(_run(compiled, script, chunk))
    assert got == want


def _strip_pings(trace: list) -> list:
    # A PING carries 8 random bytes (and its PONG echoes them): blank them on the wire image.
    from backhaul.protocol.constants import HEADER_SIZE, FrameType

    out = []
    for entry in trace:
        if len(entry) == 3 and entry[1] == "bytes":
            data, blanked, i = entry[2], bytearray(), 0
            while i + HEADER_SIZE <= len(data):
                # protocol.md's header: type, flags, reserved (2), stream id (4), length (4)
                kind = data[i]
                length = int.from_bytes(data[i + 8 : i + 12], "big")
                frame = bytearray(data[i : i + HEADER_SIZE + length])
                if kind in (int(FrameType.PING), int(FrameType.PONG)):
                    frame[HEADER_SIZE:] = bytes(length)
                blanked += frame
                i += HEADER_SIZE + length
            out.append((entry[0], "bytes", bytes(blanked + data[i:])))
        else:
            out.append(entry)
    return out
