"""The connector's allow-list (connector.admission): which OPEN is dialed, and which is
refused with which code and reason. Plain dicts in, a Refusal or None out."""

from __future__ import annotations

import pytest

from backhaul.connector import admission
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode

APPS = {
    "web": {"name": "web", "proto": "http", "target": "10.0.0.5:8080"},
    "db": {"name": "db", "proto": "tcp", "target": "10.0.0.6:5432"},
    "dns": {"name": "dns", "proto": "udp", "target": "10.0.0.53:53"},
}


def open_meta(app, target, proto) -> dict:
    return mux.stream_meta(app, target, proto, "198.51.100.7:40000", "req-1")


@pytest.mark.parametrize("app, target, proto", [("web", "10.0.0.5:8080", "http"), ("db", "10.0.0.6:5432", "tcp"), ("dns", "10.0.0.53:53", "udp")])
def test_the_configured_app_kind_and_target_are_let_through(app, target, proto):
    assert admission.admit(APPS, open_meta(app, target, proto), draining=False) is None
    assert admission.refusal(APPS, app, target, proto) is None


@pytest.mark.parametrize("name", ["nope", None, 7, ["db"]])
def test_an_app_the_configuration_lacks_is_unknown_app(name):
    refused = admission.admit(APPS, open_meta(name, "10.0.0.6:5432", "tcp"), draining=False)
    assert refused == (ErrorCode.UNKNOWN_APP, f"this connector has no app {name!r}")
    assert refused.code == ErrorCode.UNKNOWN_APP


@pytest.mark.parametrize(
    "app, target, proto, reason",
    [
        ("db", "10.0.0.7:5432", "tcp", "target '10.0.0.7:5432' is not allowed for app 'db'"),
        ("db", "10.0.0.6:5432", "http", "target '10.0.0.6:5432' is not allowed for app 'db'"),
        ("db", "10.0.0.6:5432", "udp", "udp target '10.0.0.6:5432' is not allowed for app 'db'"),
        ("dns", "10.0.0.53:53", "tcp", "target '10.0.0.53:53' is not allowed for app 'dns'"),
        ("web", "10.0.0.5:8080", None, "target '10.0.0.5:8080' is not allowed for app 'web'"),
        ("web", None, "http", "target None is not allowed for app 'web'"),
    ],
    ids=["other-target", "http-open-for-tcp-app", "udp-open-for-tcp-app", "tcp-open-for-udp-app", "no-proto", "no-target"],
)
def test_another_target_or_kind_is_target_not_allowed(app, target, proto, reason):
    assert admission.admit(APPS, open_meta(app, target, proto), draining=False) == (ErrorCode.TARGET_NOT_ALLOWED, reason)


def test_an_app_of_an_unknown_kind_allows_nothing():
    apps = {"odd": {"name": "odd", "proto": "sctp", "target": "10.0.0.9:9"}}
    for proto in ("sctp", "tcp", "udp"):
        refused = admission.admit(apps, open_meta("odd", "10.0.0.9:9", proto), draining=False)
        assert refused is not None and refused.code == ErrorCode.TARGET_NOT_ALLOWED


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_configured_target_that_is_not_host_port_is_target_not_allowed_saying_so(proto):
    apps = {"bad": {"name": "bad", "proto": proto, "target": "not-a-target"}}
    refused = admission.admit(apps, open_meta("bad", "not-a-target", proto), draining=False)
    assert refused.code == ErrorCode.TARGET_NOT_ALLOWED and "is not HOST:PORT" in refused.reason


@pytest.mark.parametrize("app, target, proto", [("db", "10.0.0.6:5432", "tcp"), ("dns", "10.0.0.53:53", "udp")])
def test_a_draining_connector_refuses_allowed_streams_with_refused_stream(app, target, proto):
    assert admission.admit(APPS, open_meta(app, target, proto), draining=True) == (ErrorCode.REFUSED_STREAM, "the connector is draining")


def test_a_draining_connector_still_says_what_no_connector_would_take():
    # REFUSED_STREAM makes the relay try another connector; these would be refused there too.
    assert admission.admit(APPS, open_meta("nope", "10.0.0.6:5432", "tcp"), draining=True).code == ErrorCode.UNKNOWN_APP
    assert admission.admit(APPS, open_meta("db", "10.0.0.7:5432", "tcp"), draining=True).code == ErrorCode.TARGET_NOT_ALLOWED


def test_a_new_configuration_is_judged_by_the_same_rule():
    changed = {**APPS, "db": {**APPS["db"], "target": "10.0.0.8:5432"}}
    del changed["dns"]
    assert admission.refusal(changed, "db", "10.0.0.6:5432", "tcp").code == ErrorCode.TARGET_NOT_ALLOWED
    assert admission.refusal(changed, "dns", "10.0.0.53:53", "udp").code == ErrorCode.UNKNOWN_APP
    assert admission.refusal(changed, "web", "10.0.0.5:8080", "http") is None


# Moved from test_udp_flows.py with udp_flows.refusal, whose rule is admission's now.


@pytest.mark.parametrize(
    "meta_target, app",
    [
        ("10.0.0.1:53", {"proto": "tcp", "target": "10.0.0.1:53"}),
        ("10.0.0.2:53", {"proto": "udp", "target": "10.0.0.1:53"}),
        ("not-a-target", {"proto": "udp", "target": "not-a-target"}),
    ],
    ids=["tcp-app", "other-target", "malformed"],
)
def test_connector_refuses_flows_its_config_does_not_allow(meta_target, app):
    refused = admission.refusal({"x": app}, "x", meta_target, "udp")
    assert refused is not None and refused[0] == ErrorCode.TARGET_NOT_ALLOWED


def test_connector_allows_exactly_the_configured_udp_target():
    assert admission.refusal({"x": {"proto": "udp", "target": "10.0.0.1:53"}}, "x", "10.0.0.1:53", "udp") is None
