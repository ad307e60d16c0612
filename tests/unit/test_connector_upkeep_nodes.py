"""A connector's control calls when its enrolled address is gone (connector.upkeep): config,
heartbeat and renewal go to a node of the last list instead; a refusal of the connector is
never tried elsewhere. A real control API over real TLS on 127.0.0.1, a real store."""

from __future__ import annotations

import asyncio
import logging
import socket

import orjson
import pytest

from backhaul.connector import control_client
from backhaul.connector.settings import ConnectorSettings
from backhaul.connector.state import STATE_FILE, ConnectorState
from backhaul.connector.upkeep import Upkeep
from backhaul.errors import ServiceError
from backhaul.control.context import ControlContext, ControlSettings
from backhaul.control.init import initialize
from tests.unit.test_control_api import Service

pytestmark = pytest.mark.codec_independent


@pytest.fixture
def run(tmp_path):
    """run(async fn(service)) -> its result, with a real control API served meanwhile."""
    data_dir = tmp_path / "service"
    initialize(data_dir, ["localhost", "127.0.0.1"])
    ctx = ControlContext.load(data_dir, settings=ControlSettings(housekeeping_interval=0))

    def runner(fn):
        async def main():
            async with Service(data_dir, ctx) as service:
                return await fn(service)

        return asyncio.run(asyncio.wait_for(main(), 60))

    yield runner
    ctx.store.close()


def dead_url() -> str:
    """An https URL on 127.0.0.1 nobody listens on (the port is bound and closed here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{sock.getsockname()[1]}"


def moved(state: ConnectorState, url: str) -> ConnectorState:
    """The same connector, enrolled at ``url`` (its state file rewritten)."""
    path = state.state_dir / STATE_FILE
    info = orjson.loads(path.read_bytes())
    path.write_bytes(orjson.dumps({**info, "service": url}))
    return ConnectorState.load(state.state_dir)


def upkeep_for(state: ConnectorState, fallbacks: list[str], seen: dict) -> Upkeep:
    settings = ConnectorSettings(state_dir=state.state_dir)
    return Upkeep(
        lambda: settings,
        state,
        asyncio.Event(),
        apply=lambda apps: seen.setdefault("apps", sorted(apps)),
        renewed=lambda new: seen.setdefault("renewed", new.cert_serial),
        deleted=lambda exc: seen.setdefault("deleted", str(exc)),
        load=lambda: {"streams": 0, "bytes_in": 0, "bytes_out": 0, "apps": {}},
        nodes=lambda raw, source: seen.setdefault("nodes", (raw, source)),
        fallbacks=lambda: list(fallbacks),
    )


def test_config_heartbeat_and_renewal_fall_back_to_a_listed_node(run, tmp_path, caplog):
    async def go(s):
        status, body, _ = await s.call(
            "POST", "/v1/apps", {"name": "db", "group": "default", "proto": "tcp", "port": 15432, "target": "10.0.0.5:5432"}
        )
        assert status == 201, body
        state = moved(await s.register(tmp_path / "conn"), dead_url())
        seen: dict = {}
        upkeep = upkeep_for(state, [dead_url(), s.url], seen)
        upkeep.open()
        try:
            with caplog.at_level(logging.INFO, "backhaul.connector"):
                await upkeep.pull()
            assert seen["apps"] == ["db"] and upkeep.config_version == s.store.config_version()
            tried = [r for r in caplog.records if r.getMessage() == "control call failed; trying another relay node"]
            assert [r.next for r in tried][-1] == s.url and len(tried) == 2
            answer = await upkeep._anywhere(lambda base: control_client.heartbeat(state, upkeep.http, {"version": "1.2"}, base))
            assert answer["config_version"] == s.store.config_version()
            assert s.store.get_connector(state.connector_id).version == "1.2"
            renewed = await upkeep._anywhere(lambda base: control_client.renew(state, upkeep.http, base))
            assert renewed.cert_serial != state.cert_serial
            assert s.store.get_connector(state.connector_id).cert_serial == renewed.cert_serial
            assert renewed.service_url == state.service_url  # still enrolled where it was
        finally:
            await upkeep.close()

        # Nowhere to go: the last error says so.
        nowhere = upkeep_for(renewed, [dead_url()], {})
        nowhere.open()
        try:
            with pytest.raises(ServiceError, match="failed"):
                await nowhere._anywhere(lambda base: control_client.pull_config(renewed, nowhere.http, None, base))
        finally:
            await nowhere.close()

    run(go)


def test_a_refused_connector_is_not_tried_on_other_nodes(run, tmp_path, caplog):
    async def go(s):
        state = await s.register(tmp_path / "conn")
        status, _, _ = await s.call("DELETE", f"/v1/connectors/{state.connector_id}")
        assert status == 200
        seen: dict = {}
        upkeep = upkeep_for(state, [dead_url()], seen)
        upkeep.open()
        try:
            with caplog.at_level(logging.INFO, "backhaul.connector"):
                await upkeep.pull()
        finally:
            await upkeep.close()
        assert "deleted" in seen["deleted"]
        assert not [r for r in caplog.records if r.getMessage() == "control call failed; trying another relay node"]

    run(go)
