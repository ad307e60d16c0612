"""One counting system on the connector: what the worker's parts record reaches its
snapshot (/metrics) and the drain's log line under one name each."""

from __future__ import annotations

import datetime
from pathlib import Path

from backhaul.config import UdpLimits
from backhaul.connector.metrics import P, ConnectorMetrics, WorkerNow
from backhaul.connector.state import ConnectorState
from backhaul.connector.streams import open_failure
from backhaul.connector.udp_flows import UdpFlows

EXPIRES = datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc)


def state() -> ConnectorState:
    d = Path("/nonexistent/state")
    return ConnectorState(
        d, "https://relay.example:8443", "relay.example", 8443, "c-1", "one",
        d / "ca.pem", d / "cert.pem", d / "key.pem", 7, EXPIRES - datetime.timedelta(days=90), EXPIRES,
    )


def test_the_parts_record_into_one_place_and_the_snapshot_publishes_it():
    metrics = ConnectorMetrics()
    flows = UdpFlows(UdpLimits(), metrics.events, open_failure)
    metrics.tunnels_opened += 2
    metrics.streams_opened += 3  # three OPENs: one refused, one dialed, one a UDP flow
    metrics.count("streams_refused")
    metrics.count("streams_dialed")
    flows.from_tunnel(None, 9, b"late")  # a datagram for no flow: dropped and counted
    snap = metrics.snapshot(WorkerNow(state(), [], 0, 4), worker=1, session_log=False, reporter_info={})
    series = snap["series"]
    assert series[P + "events_total"] == [[["c-1", "streams_dialed"], 1], [["c-1", "streams_refused"], 1], [["c-1", "udp_dropped_no_flow"], 1]]
    assert series[P + "tunnels_opened_total"] == [[["c-1"], 2]]
    assert series[P + "streams_opened_total"] == [[["c-1"], 3]]
    assert series[P + "config_version"] == [[["c-1"], 4]]
    assert series[P + "certificate_expiry_timestamp_seconds"] == [[["c-1"], EXPIRES.timestamp()]]
    assert snap["worker"] == 1 and snap["info"]["name"] == "one" and snap["info"]["session_log"] is False


def test_the_drain_line_reads_the_same_counts_under_the_same_names():
    metrics = ConnectorMetrics()
    metrics.tunnels_opened = 1
    metrics.streams_opened = 5
    metrics.count("streams_dialed", 4)
    metrics.count("udp_flows_opened")
    assert metrics.totals() == {"tunnels_opened": 1, "streams_opened": 5, "streams_dialed": 4, "udp_flows_opened": 1}


def test_without_a_config_yet_no_config_version_is_published():
    snap = ConnectorMetrics().snapshot(WorkerNow(state(), [], 0, None), worker=0, session_log=True, reporter_info={"metrics": "127.0.0.1:9464"})
    assert P + "config_version" not in snap["series"]
    assert snap["series"][P + "events_total"] == [] and snap["series"][P + "session_log_enabled"] == [[["c-1"], 1]]
    assert snap["info"]["metrics"] == "127.0.0.1:9464"
