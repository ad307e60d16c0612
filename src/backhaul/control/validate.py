"""Validation of what admins and connectors send: names, ports, targets, URLs.

Every function returns the cleaned value or raises ``Invalid`` with a message that
says what is wrong and what a good value looks like.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import yarl

from backhaul.errors import BackhaulError
from backhaul.store import App

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
PROTOCOLS = ("tcp", "udp", "http")
PREAUTH = ("passthrough", "oidc")
#: Longest free-text field (connector name, host name, version) kept from a connector.
MAX_TEXT = 255
#: Longest health check path of an http app.
MAX_HEALTH_PATH = 1024
_HEALTH_PATH = re.compile(r"^/[\x21-\x7e]*$")
#: Largest CA bundle an http app may carry (it travels in every config pull of its group,
#: and the whole request must fit in ControlSettings.max_body).
MAX_CA_BUNDLE = 32 * 1024
#: Options only http apps take, with the value that means "not set".
HTTP_OPTIONS = {"external_host": None, "internal_url": None, "preauth": None, "keep_host": False, "backend_ca": None, "backend_insecure": False, "health_path": None}


class Invalid(BackhaulError):
    """A request field is malformed."""

    exit_code = 2


def name(value: Any, what: str = "name") -> str:
    """A group or app name: 1-63 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise Invalid(f"{what} {value!r} is not valid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def text(value: Any, what: str, *, default: str = "") -> str:
    """Free text from a peer: a string of printable characters, at most MAX_TEXT long."""
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise Invalid(f"{what} must be printable text of at most {MAX_TEXT} characters")
    return value


def integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"{what} must be a whole number from {low} to {high}, not {value!r}")
    return value


def number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise Invalid(f"{what} must be a number from {low} to {high}, not {value!r}")
    return float(value)


def port(value: Any, what: str = "port") -> int:
    return integer(value, what, 1, 65535)


def host(value: Any, what: str = "host") -> str:
    """A DNS name or an IP address (IPv6 without brackets), lowercased."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"{what} must be a DNS name or an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise Invalid(f"{what} {value!r} is neither a DNS name nor an IP address")
    return value.rstrip(".").lower()


def target(value: Any) -> str:
    """``host:port`` (``[v6]:port`` for IPv6) that a connector dials."""
    if not isinstance(value, str) or ":" not in value:
        raise Invalid(f"target {value!r} must be HOST:PORT, e.g. 10.0.0.5:5432 or [fd00::5]:22")
    raw_host, _, raw_port = value.rpartition(":")
    bracketed = raw_host.startswith("[") and raw_host.endswith("]")
    if ":" in raw_host and not bracketed:
        raise Invalid(f"target {value!r}: write IPv6 addresses in brackets, e.g. [fd00::5]:22")
    if not raw_port.isdigit():
        raise Invalid(f"target {value!r} must end with :PORT (1-65535)")
    h = host(raw_host[1:-1] if bracketed else raw_host, "target host")
    p = port(int(raw_port), "target port")
    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"


def internal_url(value: Any) -> tuple[str, str]:
    """An http(s) URL of a private web app; returns (url, its host:port target)."""
    if not isinstance(value, str) or len(value) > 2048:
        raise Invalid("internal URL must be an http:// or https:// URL of at most 2048 characters")
    try:
        url = yarl.URL(value)
    except ValueError as exc:
        raise Invalid(f"internal URL {value!r} is not a URL ({exc})") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise Invalid(f"internal URL {value!r} must start with http:// or https:// and name a host")
    if url.user or url.password:
        raise Invalid("internal URL must not carry a user name or password")
    try:
        url_port = url.port
    except ValueError as exc:
        raise Invalid(f"internal URL {value!r} has a bad port") from exc
    h = host(url.host, "internal URL host")
    p = port(url_port or (443 if url.scheme == "https" else 80), "internal URL port")
    return str(url), (f"[{h}]:{p}" if ":" in h else f"{h}:{p}")


def health_path(value: Any) -> str | None:
    """An http app's health check path: absolute, printable ASCII without spaces, optional query."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_HEALTH_PATH or not _HEALTH_PATH.match(value) or "#" in value:
        raise Invalid(
            f"health path {value!r} must be an absolute path such as /healthz (optionally with ?query), "
            f"printable ASCII without spaces or '#', at most {MAX_HEALTH_PATH} characters"
        )
    return value


def health_map(value: Any, limit: int) -> dict[str, bool] | None:
    """A connector's report of which apps it can reach: {app name: true | false}, at most ``limit`` entries."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > limit:
        raise Invalid(f"apps must be an object of at most {limit} app names, each true (reachable) or false")
    for key, ok in value.items():
        name(key, "app name")
        if not isinstance(ok, bool):
            raise Invalid(f"apps[{key!r}] must be true (reachable) or false, not {ok!r}")
    return value


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{what} must be true or false, not {value!r}")
    return value


def ca_bundle(value: Any) -> str | None:
    """A PEM bundle of one or more CA certificates, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_CA_BUNDLE:
        raise Invalid(f"backend_ca must be PEM text of at most {MAX_CA_BUNDLE} bytes")
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(value.encode("ascii"))
    except (ValueError, UnicodeError) as exc:
        raise Invalid(f"backend_ca is not a PEM bundle of certificates ({exc})") from None
    if not certificates:
        raise Invalid("backend_ca holds no certificate")
    return value.strip() + "\n"


def app(body: dict[str, Any], *, reserved_ports: frozenset[int] = frozenset()) -> App:
    """An App from a publish request body."""
    proto = body.get("proto")
    if proto not in PROTOCOLS:
        raise Invalid(f"proto must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
    common = {"name": name(body.get("name"), "app name"), "group": name(body.get("group", "default"), "group"), "proto": proto}
    if proto in ("tcp", "udp"):
        for extra, unset in HTTP_OPTIONS.items():
            if body.get(extra, unset) not in (None, unset):
                raise Invalid(f"{extra} is only for http apps; a {proto} app takes port and target")
        p = port(body.get("port"))
        if p in reserved_ports:
            raise Invalid(f"port {p} is used by the relay itself; pick another port")
        return App(**common, port=p, target=target(body.get("target")))
    for extra in ("port", "target"):
        if body.get(extra) is not None:
            raise Invalid(f"{extra} is only for tcp/udp apps; an http app takes external_host and internal_url")
    url, url_target = internal_url(body.get("internal_url"))
    preauth = body.get("preauth") or "passthrough"
    if preauth not in PREAUTH:
        raise Invalid(f"preauth must be one of {', '.join(PREAUTH)}, not {preauth!r}")
    backend_ca = ca_bundle(body.get("backend_ca"))
    backend_insecure = boolean(body.get("backend_insecure", False), "backend_insecure")
    if (backend_ca is not None or backend_insecure) and not url.startswith("https:"):
        raise Invalid("backend_ca and backend_insecure are for an https:// internal URL")
    if backend_ca is not None and backend_insecure:
        raise Invalid("give either backend_ca (verify with this CA) or backend_insecure (do not verify), not both")
    return App(
        **common,
        target=url_target,
        external_host=host(body.get("external_host"), "external host"),
        internal_url=url,
        preauth=preauth,
        keep_host=boolean(body.get("keep_host", False), "keep_host"),
        backend_ca=backend_ca,
        backend_insecure=backend_insecure,
        health_path=health_path(body.get("health_path")),
    )
