"""A connector's saved configuration (connector.upkeep, ``config.json`` in its state dir):
every pull saves what it applied, and a worker that starts while no relay answers serves
the saved apps instead of allowing nothing. A real control API over real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import stat

import orjson
import pytest

from backhaul.connector.upkeep import CONFIG_FILE
from tests.unit.test_connector_upkeep_nodes import dead_url, moved, run, upkeep_for  # noqa: F401 (run: a fixture)

pytestmark = pytest.mark.codec_independent


def test_a_pull_saves_the_config_and_a_start_without_the_service_serves_it(run, tmp_path):  # noqa: F811
    async def go(s):
        status, body, _ = await s.call(
            "POST", "/v1/apps", {"name": "db", "group": "default", "proto": "tcp", "port": 15433, "target": "10.0.0.5:5432"}
        )
        assert status == 201, body
        state = await s.register(tmp_path / "conn")
        seen: dict = {}
        upkeep = upkeep_for(state, [], seen)
        upkeep.open()
        try:
            await upkeep.pull(initial=True)
        finally:
            await upkeep.close()
        assert seen["apps"] == ["db"]
        saved = state.state_dir / CONFIG_FILE
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600, "the saved config names internal addresses: owner only"
        assert [app["name"] for app in orjson.loads(saved.read_bytes())["config"]["apps"]] == ["db"]

        # The same connector started with its service gone: the saved apps, at the first failure.
        gone = moved(state, dead_url())
        seen_later: dict = {}
        later = upkeep_for(gone, [], seen_later)
        later.open()
        try:
            await asyncio.wait_for(later.pull(initial=True), 20)
        finally:
            await later.close()
        assert seen_later["apps"] == ["db"]
        assert later.etag == upkeep.etag, "the saved ETag: an unchanged config is not fetched again"

    run(go)


def test_a_damaged_saved_config_is_not_used_and_the_start_waits_for_the_service(run, tmp_path, caplog):  # noqa: F811
    async def go(s):
        state = moved(await s.register(tmp_path / "conn"), dead_url())
        (state.state_dir / CONFIG_FILE).write_bytes(b'{"etag": "x", "config": {"apps": "not a list"}}')
        seen: dict = {}
        upkeep = upkeep_for(state, [], seen)
        upkeep.open()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(upkeep.pull(initial=True), 1.5)  # retries, never applies the bad file
        finally:
            await upkeep.close()
        assert "apps" not in seen
        assert any("the saved config cannot be used" in r.getMessage() for r in caplog.records)

    run(go)
