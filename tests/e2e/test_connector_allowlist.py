"""A connector dials only what its pulled configuration allows, whatever the relay asks.

The relay here is a real RelayWorker running in this test process (so the test can make
it ask for things a well-behaved relay never would); the connector is a real process
with real mTLS. A compromised relay must not turn the connector into an open proxy.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvloop

from backhaul.protocol.constants import ErrorCode
from backhaul.protocol.mux import stream_meta
from backhaul.relay.worker import RelaySettings, RelayWorker

from .harness import System, wait_until

pytestmark = pytest.mark.e2e


class Recorder:
    """A stream endpoint that only remembers what happened to its stream."""

    def __init__(self) -> None:
        self.outcome: tuple | None = None

    def on_accepted(self):
        self.outcome = ("accepted",)

    def on_rejected(self, code, reason):
        self.outcome = ("rejected", code, reason)

    def on_reset(self, code, reason):
        self.outcome = ("reset", code, reason)

    def on_data(self, data, end):
        pass

    def on_end(self):
        pass

    def on_write_resumed(self):
        pass


@pytest.fixture
def rogue(tmp_path):
    """An initialized data dir served by a RelayWorker on a thread of this process."""
    system = System(tmp_path)
    system.init()
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    worker = asyncio.run_coroutine_threadsafe(_make_worker(system), loop).result(30)
    try:
        yield system, worker, loop
    finally:
        asyncio.run_coroutine_threadsafe(worker.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        system.stop()


async def _make_worker(system: System) -> RelayWorker:
    worker = RelayWorker(RelaySettings(data_dir=system.data_dir, listen=f"127.0.0.1:{system.port}", drain_timeout=0.5))
    await worker.start()
    return worker


def _open(worker: RelayWorker, loop, meta: dict) -> Recorder:
    recorder = Recorder()

    async def go():
        tunnel = worker.registry.tunnels()[0]
        tunnel.open(meta, recorder)

    asyncio.run_coroutine_threadsafe(go(), loop).result(10)
    wait_until(lambda: recorder.outcome is not None, 15, "the connector's answer")
    return recorder


def test_connector_refuses_targets_and_apps_outside_its_config(rogue, backend):
    system, worker, loop = rogue
    echo = backend("echo")
    other = backend("echo")
    system.publish_tcp("allowed", echo.target)
    system.start_connector("one", tunnels=1)
    wait_until(lambda: worker.registry.tunnels(), 30, "the connector's tunnel")
    wait_until(
        lambda: _open(worker, loop, stream_meta("allowed", echo.target, "tcp", "127.0.0.1:1", "t0")).outcome
        == ("accepted",),
        30,
        "the allowed app to be accepted (config pulled)",
        interval=0.3,
    )

    wrong_target = _open(worker, loop, stream_meta("allowed", other.target, "tcp", "127.0.0.1:1", "t1"))
    assert wrong_target.outcome[:2] == ("rejected", ErrorCode.TARGET_NOT_ALLOWED)
    unknown = _open(worker, loop, stream_meta("nope", echo.target, "tcp", "127.0.0.1:1", "t2"))
    assert unknown.outcome[:2] == ("rejected", ErrorCode.UNKNOWN_APP)
    log = system.connectors["one"].log()
    assert "not allowed" in log and "has no app" in log
