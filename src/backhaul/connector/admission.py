"""The connector's allow-list: may a stream or flow of an app reach the target it names?

A connector dials only what its pulled configuration allows: the app the OPEN names
must be in the configuration, of the kind the OPEN asks for (a TCP or HTTP stream for a
tcp or http app, a UDP flow for a udp app), with the very target the OPEN names. This
is the one place that decides it, for an OPEN (``admit``) and for streams and flows
already open when a new configuration arrives (``refusal``: the same rule).

Every refusal carries the wire code the relay acts on and a reason a human can act on:

- UNKNOWN_APP: the configuration has no such app (the relay's view is newer or older);
- TARGET_NOT_ALLOWED: the app exists but not with that kind or target, or the target is
  not ``HOST:PORT``; another connector of the group would refuse it as well;
- REFUSED_STREAM: allowed, but this connector is draining; the relay tries another one.

Sans I/O: plain dicts in (the app records of the pulled configuration, the OPEN's
metadata), a ``Refusal`` or None out.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

from backhaul.errors import ConfigError
from backhaul.protocol.constants import ErrorCode
from backhaul.transport.sockets import parse_hostport

#: the kinds of app (and of the stream an OPEN asks for: the same word)
KINDS = ("tcp", "http", "udp")
DRAINING = "the connector is draining"


class Refusal(NamedTuple):
    """Why a stream or flow is not let through: the OPEN_FAIL / RST code and its reason."""

    code: int
    reason: str


def refusal(apps: Mapping[str, dict], name: object, target: object, proto: object) -> Refusal | None:
    """Why a ``proto`` stream (``"tcp"``, ``"http"``, ``"udp"``) of app ``name`` to ``target``
    is not allowed by ``apps`` (the pulled configuration, by app name), or None when it is."""
    app = apps.get(name) if isinstance(name, str) else None
    if app is None:
        return Refusal(ErrorCode.UNKNOWN_APP, f"this connector has no app {name!r}")
    kind = app.get("proto")
    if kind not in KINDS or proto != kind or not isinstance(target, str) or app.get("target") != target:
        what = "udp target" if proto == "udp" else "target"
        return Refusal(ErrorCode.TARGET_NOT_ALLOWED, f"{what} {target!r} is not allowed for app {name!r}")
    try:
        parse_hostport(target, "target")
    except ConfigError as exc:
        return Refusal(ErrorCode.TARGET_NOT_ALLOWED, str(exc))
    return None


def admit(apps: Mapping[str, dict], meta: dict, draining: bool) -> Refusal | None:
    """Why the OPEN with ``meta`` must be refused, or None to dial it.

    A draining connector refuses even allowed streams, but only after the allow-list,
    so that what no connector of the group would take is refused as such."""
    refused = refusal(apps, meta.get("app"), meta.get("target"), meta.get("proto"))
    if refused is None and draining:
        return Refusal(ErrorCode.REFUSED_STREAM, DRAINING)
    return refused
