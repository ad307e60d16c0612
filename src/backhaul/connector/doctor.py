"""`backhaul connector doctor`: checks what a connector needs and says what to fix.

Each check gives ok, warn, fail or skip (when a check it depends on failed), a detail
line and, unless ok, a fix. The exit status is non-zero when any check fails; warnings
alone exit 0. The checks, in order: the registration in the state dir, the certificate's
dates, a TCP connection to the relay, TLS with the pinned CA (both ways), the relay's CA
against the pin, the relay accepting this connector, clock skew (from the relay's HTTP
Date header), the open-file limit and the ephemeral port range.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import email.utils
import hmac
import resource
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from backhaul import pki, tlsconfig
from backhaul.connector.control_client import connector_session
from backhaul.connector.state import ConnectorState
from backhaul.errors import BackhaulError
from backhaul.jsonhttp import request_json

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: The relay back-dates certificates by this much, so a clock this far behind still works.
CLOCK_FAIL = pki.CLOCK_SKEW.total_seconds()
#: Beyond this, skew is worth fixing before it grows (the Date header has 1 s resolution).
CLOCK_WARN = 5.0
#: Below this many open files per process, a busy connector runs out of sockets.
NOFILE_WANTED = 65536
NOFILE_FAIL = 1024
#: Below this many ephemeral ports, many streams to one target run out of source ports.
PORTS_WANTED = 16384
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
MAX_RESPONSE = 1024 * 1024


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclasses.dataclass
class Relay:
    """What the network checks learned about the relay, for the checks after them."""

    reachable: bool = False
    tls_ok: bool = False
    date: datetime.datetime | None = None
    #: when the answer carrying ``date`` was received (local clock, mid-request)
    seen_at: datetime.datetime | None = None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _load_state(state_dir: Path):
    """(state, registration check); the certificate's dates are left to their own check."""
    try:
        # Load as of the certificate's own start, so an expired certificate still loads and
        # the certificate check can say so with its dates.
        not_before = pki.load_cert_file(state_dir / "cert.pem").not_valid_before_utc
        state = ConnectorState.load(state_dir, now=not_before)
    except BackhaulError as exc:
        try:
            ConnectorState.load(state_dir)
        except BackhaulError as precise:
            exc = precise
        return None, Check("registration", FAIL, str(exc), "fix the state dir as the message says, or register again")
    return state, Check(
        "registration", OK, f"connector {state.connector_id} ({state.name}) of {state.service_url}, state in {state_dir}"
    )


def check_certificate(state, now: datetime.datetime) -> Check:
    """The connector certificate's dates against this machine's clock."""
    not_before, not_after = state.cert_not_before, state.cert_not_after
    left = (not_after - now).total_seconds()
    if now < not_before:
        return Check(
            "certificate", FAIL, f"not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC, and this machine says it is earlier",
            "this machine's clock is behind: enable time sync (timedatectl set-ntp true, or chrony)",
        )
    if left <= 0:
        return Check(
            "certificate", FAIL, f"expired on {not_after:%Y-%m-%d %H:%M:%S} UTC",
            "register again with a new token (`backhaul admin token create`); a connector renews its certificate "
            "only while it still has a valid one",
        )
    days = left / 86400
    if state.renewal_due(now):
        return Check(
            "certificate", WARN, f"expires {not_after:%Y-%m-%d %H:%M} UTC ({days:.1f} days left); renewal is due",
            "a running connector renews at its next heartbeat; if this stays, check the relay checks below "
            "and the connector's log for 'certificate renewal failed'",
        )
    return Check("certificate", OK, f"expires {not_after:%Y-%m-%d %H:%M} UTC ({days:.1f} days left)")


def check_reachable(host: str, port: int, timeout: float, relay: Relay) -> Check:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        return Check("relay_reachable", FAIL, f"{host} does not resolve: {exc.strerror}", "check DNS, or the host in the service URL")
    except (OSError, TimeoutError) as exc:
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
        return Check(
            "relay_reachable", FAIL, f"cannot connect to {host}:{port}: {what}",
            f"check that the relay runs and that outbound TCP to {host}:{port} is allowed (firewall, proxy)",
        )
    relay.reachable = True
    return Check("relay_reachable", OK, f"TCP connection to {host}:{port} in {1000 * (time.monotonic() - started):.1f} ms")


async def _get(session: aiohttp.ClientSession, url: str, relay: Relay):
    sent = _now()
    answer = await request_json(session, "GET", url, limit=MAX_RESPONSE)
    date = answer.headers.get("Date")
    if date and relay.date is None:
        try:
            relay.date = email.utils.parsedate_to_datetime(date)
            relay.seen_at = sent + (_now() - sent) / 2
        except (TypeError, ValueError):
            pass
    return answer


def _tls_failure(exc: BaseException) -> Check:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None) or str(exc.certificate_error)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            fix = "the relay's certificate does not name the host of the service URL; use a name from `service init --name`"
        else:
            fix = "the relay's certificate is not from the CA this connector pinned (see ca_pin)"
        return Check("tls", FAIL, f"the relay's certificate did not verify: {reason}", fix)
    reason = str(getattr(exc, "os_error", None) or exc)
    if "alert" in reason.lower():
        return Check(
            "tls", FAIL, f"the relay refused this connector's certificate: {reason}",
            "the certificate is expired, revoked or from another CA: register again with a new token",
        )
    return Check("tls", FAIL, f"TLS with the relay failed: {reason}", "check that the service URL points at a backhaul relay")


async def _network_checks(state, pin: str | None, timeout: float, relay: Relay) -> list[Check]:
    checks: list[Check] = []
    # TLS both ways: the relay's certificate against ca.pem, and this connector's certificate.
    session = connector_session(state, timeout=timeout)
    try:
        try:
            await _get(session, f"{state.service_url}/v1/health", relay)
            relay.tls_ok = True
            checks.append(Check("tls", OK, "TLS 1.3; the relay's certificate verified against ca.pem; ours accepted"))
        except (aiohttp.ClientError, ssl.SSLError, asyncio.TimeoutError, BackhaulError) as exc:
            checks.append(_tls_failure(exc))
        # The relay's CA, fetched without trusting it, against the pin.
        local = pki.fingerprint_sha256(pki.load_cert_file(state.ca_path))
        probe = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tlsconfig.pinning_probe_context()), timeout=aiohttp.ClientTimeout(total=timeout)
        )
        try:
            answer = await _get(probe, f"{state.service_url}/v1/ca", relay)
            served = answer.body.get("ca") if isinstance(answer.body, dict) else None
            remote = pki.fingerprint_sha256(served) if isinstance(served, str) else None
        except (aiohttp.ClientError, ssl.SSLError, asyncio.TimeoutError, BackhaulError) as exc:
            remote = None
            checks.append(Check("ca_pin", FAIL, f"cannot fetch the relay's CA: {exc}", "check that the service URL points at a backhaul relay"))
        finally:
            await probe.close()
        if remote is not None:
            checks.append(_pin_check(local, remote, pin))
        # The relay accepting this connector (not deleted, certificate not replaced).
        if relay.tls_ok:
            checks.append(await _auth_check(session, state, relay))
        else:
            checks.append(Check("authentication", SKIP, "needs TLS with the relay"))
    finally:
        await session.close()
    return checks


def _pin_check(local: str, remote: str, pin: str | None) -> Check:
    if not hmac.compare_digest(local, remote):
        return Check(
            "ca_pin", FAIL, f"the relay's CA has SHA-256 {remote}, but this connector pins {local} (ca.pem)",
            "the service was initialized anew, or this is not your relay: register again with a token from it",
        )
    if pin is not None and not hmac.compare_digest(pin, local):
        return Check(
            "ca_pin", FAIL, f"the relay's CA and ca.pem have SHA-256 {local}, not the expected {pin}",
            "compare --ca-sha256 with `backhaul service init` output; if they differ, this is not your relay",
        )
    return Check("ca_pin", OK, f"the relay's CA matches ca.pem (SHA-256 {local[:16]}...)")


async def _auth_check(session: aiohttp.ClientSession, state, relay: Relay) -> Check:
    try:
        answer = await _get(session, f"{state.service_url}/v1/connector/config", relay)
    except (aiohttp.ClientError, ssl.SSLError, asyncio.TimeoutError, BackhaulError) as exc:
        return Check("authentication", FAIL, f"the config request failed: {exc}", "run the doctor again; if it persists, see the relay's log")
    if answer.status == 200 and isinstance(answer.body, dict):
        apps = answer.body.get("apps")
        return Check("authentication", OK, f"the relay accepts this connector; {len(apps or [])} app(s) in its configuration")
    detail = answer.body.get("detail") if isinstance(answer.body, dict) else None
    return Check(
        "authentication", FAIL, f"the relay refused this connector: {detail or f'HTTP {answer.status}'}",
        "register again with a new token (`backhaul admin token create`)" if answer.status == 403 else "see the relay's log",
    )


def check_clock(relay: Relay) -> Check:
    if relay.date is None or relay.seen_at is None:
        return Check("clock", SKIP, "no Date header from the relay to compare with")
    skew = (relay.seen_at - relay.date).total_seconds()
    # The Date header is cut to whole seconds: a skew under a second is not measurable.
    shown = f"this machine's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the relay's (to within 1 s)"
    fix = "enable time sync on this machine (timedatectl set-ntp true, or chrony) and on the relay"
    if abs(skew) > CLOCK_FAIL:
        return Check("clock", FAIL, shown + f"; certificates tolerate {CLOCK_FAIL:.0f} s", fix)
    if abs(skew) > CLOCK_WARN + 1:
        return Check("clock", WARN, shown, fix)
    return Check("clock", OK, shown)


def check_open_files(limits: tuple[int, int] | None = None) -> Check:
    soft, hard = limits or resource.getrlimit(resource.RLIMIT_NOFILE)
    usable = hard if hard != resource.RLIM_INFINITY else NOFILE_WANTED
    detail = f"open-file limit: soft {soft}, hard {hard} (the connector raises soft to hard; one socket per stream)"
    fix = f"set LimitNOFILE={NOFILE_WANTED} in the systemd unit, or raise the hard limit (limits.conf, ulimit -Hn)"
    if usable < NOFILE_FAIL:
        return Check("open_files", FAIL, detail, fix)
    if usable < NOFILE_WANTED:
        return Check("open_files", WARN, detail, fix)
    return Check("open_files", OK, detail)


def check_port_range(text: str | None = None) -> Check:
    try:
        text = text if text is not None else PORT_RANGE_FILE.read_text()
        low, high = (int(x) for x in text.split())
    except (OSError, ValueError) as exc:
        return Check("ephemeral_ports", SKIP, f"cannot read {PORT_RANGE_FILE}: {exc}")
    count = high - low + 1
    detail = f"ephemeral ports {low}-{high} ({count}): at most that many streams to one target at once"
    if count < PORTS_WANTED:
        return Check(
            "ephemeral_ports", WARN, detail,
            "widen it: sysctl -w net.ipv4.ip_local_port_range='1024 65535' (and keep it in /etc/sysctl.d/)",
        )
    return Check("ephemeral_ports", OK, detail)


def run_checks(state_dir: Path, pin: str | None = None, timeout: float = 5.0) -> list[Check]:
    """Every check, in order."""
    state, registration = _load_state(state_dir)
    checks = [registration]
    relay = Relay()
    if state is None:
        checks += [Check(name, SKIP, "needs a readable registration") for name in ("certificate", "relay_reachable", "tls", "ca_pin", "authentication", "clock")]
    else:
        checks.append(check_certificate(state, _now()))
        checks.append(check_reachable(state.host, state.port, timeout, relay))
        if relay.reachable:
            checks += asyncio.run(_network_checks(state, pin, timeout, relay))
        else:
            checks += [Check(name, SKIP, "needs the relay reachable") for name in ("tls", "ca_pin", "authentication")]
        checks.append(check_clock(relay))
    checks.append(check_open_files())
    checks.append(check_port_range())
    return checks


def _print(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{check.status.upper():<5} {check.name:<{width}}  {check.detail}")
        if check.fix:
            print(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    failed = [c.name for c in checks if c.status == FAIL]
    warned = [c.name for c in checks if c.status == WARN]
    if failed:
        print(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    else:
        print("all checks passed" + (f" ({len(warned)} warning(s): {', '.join(warned)})" if warned else ""))


def doctor(args: argparse.Namespace) -> int:
    """Handler of `backhaul connector doctor`."""
    pin = pki.normalize_fingerprint(args.ca_sha256) if args.ca_sha256 else None
    checks = run_checks(Path(args.state_dir), pin, args.timeout)
    ok = not any(c.status == FAIL for c in checks)
    if args.json:
        document: dict[str, Any] = {"ok": ok, "checks": [dataclasses.asdict(c) for c in checks]}
        sys.stdout.write(orjson.dumps(document).decode() + "\n")
    else:
        _print(checks)
    return 0 if ok else 1
