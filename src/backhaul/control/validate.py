"""Validation of what admins and connectors send: names, ports, targets, URLs.

Every function returns the cleaned value or raises ``Invalid`` with a message that
says what is wrong and what a good value looks like.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
import unicodedata
from typing import Any

import yarl

from backhaul.errors import BackhaulError
from backhaul.store import App

#: Longest group or app name.
MAX_NAME = 63
#: Longest DNS name (RFC 1035), counting a trailing dot.
MAX_HOST = 253
#: Longest internal URL of an http app.
MAX_URL = 2048
#: Longest free-text field (connector name, host name, version) kept from a connector.
MAX_TEXT = 255
#: Unicode categories free text may not use (but for the space): control, format (bidi
#: overrides, zero-width), line, paragraph and other space separators, which would garble
#: a table or a log line. Not "unassigned": that depends on the Unicode version. Lone
#: surrogates (Cs) never reach here: orjson refuses them.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
#: Longest health check path of an http app.
MAX_HEALTH_PATH = 1024
#: Largest CA bundle an http app may carry (it travels in every config pull of its group,
#: and the whole request must fit in ControlSettings.max_body).
MAX_CA_BUNDLE = 32 * 1024
#: Longest enrollment or admin token.
MAX_TOKEN = 256
#: Largest counter (streams, bytes) and memory figure a heartbeat may report.
MAX_COUNTER = 2**62
#: Largest CPU percentage a heartbeat may report (100 per core, up to 4096 cores).
MAX_CPU = 100.0 * 4096
PORT_RANGE = (1, 65535)
PROTOCOLS = ("tcp", "udp", "http")
PREAUTH = ("passthrough", "oidc")
#: Options only http apps take, with the value that means "not set".
HTTP_OPTIONS = {"external_host": None, "internal_url": None, "preauth": None, "keep_host": False, "backend_ca": None, "backend_insecure": False, "health_path": None}

# The patterns below are both the validation here and the "pattern" of the served OpenAPI
# document, so they use only syntax that Python and ECMA-262 (JSON Schema) read alike:
# ASCII classes and \x escapes, no \d or \w (Unicode-wide in Python), no lookarounds
# (schema-driven generators cannot draw from them). They are unanchored; fullmatch anchors.
NAME_PATTERN = f"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME_PATTERN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"{_OCTET}(?:\.{_OCTET}){{3}}"


def _ipv6_pattern() -> str:
    """RFC 3986's IPv6address, with the six groups before its last 32 bits spelled once.

    Kept small: generators build a strategy from it for every request they draw.
    """
    h16 = "[0-9A-Fa-f]{1,4}"
    # Six groups and their colons, "::" standing for one or more of them.
    six = [f"(?:{h16}:){{6}}", f"::(?:{h16}:){{0,5}}"] + [f"(?:{h16}:){{{n}}}:(?:{h16}:){{0,{5 - n}}}" for n in range(1, 6)]
    last32 = f"(?:{h16}:{h16}|{IPV4_PATTERN})"
    # "::" among the last two groups: these alone do not end in 32 bits.
    short = [f"(?:(?:{h16}:){{0,5}}{h16})?::{h16}", f"(?:(?:{h16}:){{0,6}}{h16})?::"]
    return f"(?:(?:{'|'.join(six)}){last32}|{'|'.join(short)})"


#: An IPv6 address without a zone (%eth0): an interface name means nothing on another host.
IPV6_PATTERN = _ipv6_pattern()
HOST_PATTERN = f"{DNS_NAME_PATTERN}|{IPV6_PATTERN}"
#: 1-65535; leading zeros allowed, as int() reads them.
PORT_PATTERN = "0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
TARGET_PATTERN = rf"(?:{DNS_NAME_PATTERN}|\[{IPV6_PATTERN}\]):{PORT_PATTERN}"
# The two *_LENGTH patterns are searches anchored at the start (a second pattern in place of
# a lookahead): the host of a target or URL is at most MAX_HOST long.
TARGET_HOST_LENGTH_PATTERN = rf"^(?:\[|[^:]{{1,{MAX_HOST}}}:)"
HTTPS_PATTERN = "[Hh][Tt][Tt][Pp][Ss]"
INTERNAL_URL_PATTERN = (
    rf"[Hh][Tt][Tt][Pp](?:[Ss])?://(?:{DNS_NAME_PATTERN}|\[{IPV6_PATTERN}\])(?::{PORT_PATTERN})?(?:[/?#][^\x00-\x20\x7f]*)?"
)
URL_HOST_LENGTH_PATTERN = rf"^[^:]+://(?:\[|[^:/?#]{{1,{MAX_HOST}}}(?:[:/?#]|$))"
#: A path on the app's own origin, optionally with a ?query: printable ASCII without spaces,
#: '#' or '\\', one leading '/' and not two ("//host/x" is a reference to another host,
#: and clients read '\\' as '/'), so the connector can only ever GET its app's origin.
_HEALTH_CHAR = r"[\x21\x22\x24-\x5b\x5d-\x7e]"
_HEALTH_SECOND = r"[\x21\x22\x24-\x2e\x30-\x5b\x5d-\x7e]"
HEALTH_PATH_PATTERN = rf"/(?:{_HEALTH_SECOND}{_HEALTH_CHAR}*)?"

_NAME = re.compile(NAME_PATTERN)
_HOST = re.compile(HOST_PATTERN)
_TARGET = re.compile(TARGET_PATTERN)
_TARGET_HOST_LENGTH = re.compile(TARGET_HOST_LENGTH_PATTERN)
_INTERNAL_URL = re.compile(INTERNAL_URL_PATTERN)
_URL_HOST_LENGTH = re.compile(URL_HOST_LENGTH_PATTERN)
_HEALTH_PATH = re.compile(HEALTH_PATH_PATTERN)
_PORT = re.compile(PORT_PATTERN)


class Invalid(BackhaulError):
    """A request field is malformed."""

    exit_code = 2


def name(value: Any, what: str = "name") -> str:
    """A group or app name: 1-63 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise Invalid(f"{what} {value!r} is not valid: use 1-{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def text(value: Any, what: str, *, default: str = "") -> str:
    """Free text from a peer, at most MAX_TEXT long, without characters of UNPRINTABLE_CATEGORIES."""
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_TEXT or any(map(_unprintable, value)):
        raise Invalid(f"{what} must be text of at most {MAX_TEXT} characters without control, format or separator characters but the space")
    return value


@functools.cache
def printable_pattern() -> str:
    """What text() accepts, as a JSON Schema pattern: one class of the characters it refuses.

    Spelled out from this Python's Unicode database rather than as ``\\p{Cc}``: schema-driven
    generators do not honour property escapes, and a validator's Unicode version may differ.
    Code points above U+FFFF stand as themselves: no escape means them in both dialects.
    """

    def spelled(code: int) -> str:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else chr(code)

    refused: list[str] = []
    start = None
    for code in range(sys.maxunicode + 2):
        if code <= sys.maxunicode and _unprintable(chr(code)):
            start = code if start is None else start
        elif start is not None:
            end = code - 1
            refused.append(spelled(start) if start == end else f"{spelled(start)}-{spelled(end)}")
            start = None
    return f"^[^{''.join(refused)}]*$"


def _unprintable(char: str) -> bool:
    return char != " " and unicodedata.category(char) in UNPRINTABLE_CATEGORIES


def integer(value: Any, what: str, low: int, high: int) -> int:
    # JSON has one number type: 5.0 is the whole number 5 (and a JSON Schema "integer").
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"{what} must be a whole number from {low} to {high}, not {value!r}")
    return value


def number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise Invalid(f"{what} must be a number from {low} to {high}, not {value!r}")
    return float(value)


def port(value: Any, what: str = "port") -> int:
    return integer(value, what, *PORT_RANGE)


def host(value: Any, what: str = "host") -> str:
    """A DNS name or an IP address (IPv6 without brackets), lowercased."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"{what} must be a DNS name or an IP address")
    if "%" in value:
        raise Invalid(f"{what} {value!r}: give the IPv6 address without a zone (%interface)")
    if len(value) > MAX_HOST or not _HOST.fullmatch(value):
        raise Invalid(f"{what} {value!r} is neither a DNS name nor an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value.rstrip(".").lower()


def target(value: Any) -> str:
    """``host:port`` (``[v6]:port`` for IPv6) that a connector dials."""
    if not isinstance(value, str) or ":" not in value:
        raise Invalid(f"target {value!r} must be HOST:PORT, e.g. 10.0.0.5:5432 or [fd00::5]:22")
    raw_host, _, raw_port = value.rpartition(":")
    bracketed = raw_host.startswith("[") and raw_host.endswith("]")
    if ":" in raw_host and not bracketed:
        raise Invalid(f"target {value!r}: write IPv6 addresses in brackets, e.g. [fd00::5]:22")
    if not _PORT.fullmatch(raw_port):
        raise Invalid(f"target {value!r} must end with :PORT ({PORT_RANGE[0]}-{PORT_RANGE[1]})")
    h = host(raw_host[1:-1] if bracketed else raw_host, "target host")
    if bracketed and ":" not in h:
        raise Invalid(f"target {value!r}: brackets are for IPv6 addresses only, e.g. [fd00::5]:22")
    # The checks above say what is wrong; this one is the served document's own pattern, so
    # the server can never take a target the document refuses, even if the pieces drift.
    if not _TARGET.fullmatch(value) or not _TARGET_HOST_LENGTH.match(value):
        raise Invalid(f"target {value!r} must be HOST:PORT, e.g. 10.0.0.5:5432 or [fd00::5]:22")
    p = port(int(raw_port), "target port")
    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"


def internal_url(value: Any) -> tuple[str, str]:
    """An http(s) URL of a private web app; returns (url, its host:port target)."""
    if not isinstance(value, str) or len(value) > MAX_URL:
        raise Invalid(f"internal URL must be an http:// or https:// URL of at most {MAX_URL} characters")
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
    # As in target(): the document's pattern last, so server and document cannot disagree.
    if not _INTERNAL_URL.fullmatch(value) or not _URL_HOST_LENGTH.match(value):
        raise Invalid(
            f"internal URL {value!r} must be http(s)://HOST[:PORT][/PATH] with a DNS name, an IPv4 address "
            f"or a bracketed IPv6 address as HOST, a port from {PORT_RANGE[0]} to {PORT_RANGE[1]}, and no spaces or control characters"
        )
    p = port(url_port or (443 if url.scheme == "https" else 80), "internal URL port")
    return str(url), (f"[{h}]:{p}" if ":" in h else f"{h}:{p}")


def health_path(value: Any) -> str | None:
    """An http app's health check path: a path on the app's origin, never a host of its own."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_HEALTH_PATH or not _HEALTH_PATH.fullmatch(value):
        shown = repr(value)[:80]
        if not isinstance(value, str):
            why = "it is not text"
        elif len(value) > MAX_HEALTH_PATH:
            why = f"it is longer than {MAX_HEALTH_PATH} characters"
        elif "://" in value.split("?", 1)[0] or not value.startswith(("/", "\\")):
            why = "it is not a path (give the path alone: /healthz, not http://host/healthz)"
        elif value.startswith(("//", "/\\")):
            why = "it starts with two slashes, which name another host (//host/path)"
        elif "\\" in value:
            why = "it holds a backslash, which clients read as '/'"
        else:
            why = "it holds a space, a control character, '#' or a character outside of printable ASCII"
        raise Invalid(
            f"health path {shown} is refused: {why}; a health path is a path on the app's own origin "
            f"such as /healthz (optionally with ?query), printable ASCII without spaces, '#' or '\\', "
            f"at most {MAX_HEALTH_PATH} characters"
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


def app(body: dict[str, Any]) -> App:
    """An App from a publish request body."""
    proto = body.get("proto")
    if proto not in PROTOCOLS:
        raise Invalid(f"proto must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
    common = {"name": name(body.get("name"), "app name"), "group": name(body.get("group", "default"), "group"), "proto": proto}
    if proto in ("tcp", "udp"):
        for extra, unset in HTTP_OPTIONS.items():
            value = body.get(extra)
            # `is`, not `in`: 0 == False, and 0 is not "not set".
            if value is not None and value is not unset:
                raise Invalid(f"{extra} is only for http apps; a {proto} app takes port and target")
        return App(**common, port=port(body.get("port")), target=target(body.get("target")))
    for extra in ("port", "target"):
        if body.get(extra) is not None:
            raise Invalid(f"{extra} is only for tcp/udp apps; an http app takes external_host and internal_url")
    url, url_target = internal_url(body.get("internal_url"))
    preauth = body.get("preauth")
    if preauth is None:
        preauth = "passthrough"
    elif preauth not in PREAUTH:
        raise Invalid(f"preauth must be one of {', '.join(PREAUTH)} (or null for passthrough), not {preauth!r}")
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


def _sample_app(proto: str) -> dict[str, Any]:
    """A valid app of this proto whose fields take either value of every option (an https URL)."""
    if proto == "http":
        return {"name": "x", "proto": proto, "external_host": "x", "internal_url": "https://x/"}
    return {"name": "x", "proto": proto, "port": PORT_RANGE[0], "target": f"x:{PORT_RANGE[0]}"}


def app_changes(changes: dict[str, Any], proto: str) -> None:
    """Refuse changes that no app could take, saying why they do not fit a ``proto`` app.

    Changes that some app could take may still not fit the app they are for (another proto,
    an http:// URL under a backend TLS option): that is the caller's conflict to report.
    """
    try:
        app({**_sample_app(proto), **changes})
    except Invalid as refusal:
        try:
            app({**_sample_app("tcp" if proto == "http" else "http"), **changes})
        except Invalid:
            raise refusal from None


# -- rollout: a connector group's update settings

from backhaul import maintenance  # noqa: E402  (kept in this block: the rollout's input rules)

#: The maintenance window spec, as validated here and as the served document's pattern.
WINDOW_PATTERN = maintenance.WINDOW_PATTERN
MAX_WINDOW = maintenance.MAX_WINDOW


def window(value: Any) -> str | None:
    """A maintenance window spec (``"Sat,Sun 02:00-04:00"``, UTC) in canonical form, or None for none."""
    if value is None:
        return None
    try:
        return maintenance.canonical(value)
    except maintenance.BadWindow as exc:
        raise Invalid(str(exc)) from None
