"""control.validate against the patterns the OpenAPI document states for the same fields.

The document's patterns are read by JSON Schema tools as ECMA-262 (jsonschema_rs here,
as in schemathesis); the server reads them with Python's re. Each test checks that both
readings, and the server's other checks, draw the same line.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sys

import jsonschema_rs
import pytest
import yarl
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.connector import health
from backhaul.control import validate
from backhaul.control.openapi import openapi_document

pytestmark = pytest.mark.codec_independent

SCHEMAS = openapi_document()["components"]["schemas"]


@functools.cache
def _document_accepts(field: str):
    """Whether the document's schema for ``field`` (a components/schemas name) accepts a value."""
    return jsonschema_rs.validator_for({**SCHEMAS[field], "components": {"schemas": SCHEMAS}}).is_valid


def _server_accepts(check, value) -> bool:
    try:
        check(value)
    except validate.Invalid:
        return False
    return True


def test_text_pattern_is_what_the_server_accepts_for_every_code_point():
    document = jsonschema_rs.validator_for({"type": "string", "pattern": validate.printable_pattern()}).is_valid
    # JSON cannot carry lone surrogates (orjson refuses them), so neither side sees one.
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    verdicts = {c: _server_accepts(lambda v: validate.text(v, "t"), c) for c in chars}
    accepted = [c for c, ok in verdicts.items() if ok]
    refused = [c for c, ok in verdicts.items() if not ok]
    # The pattern is one class under "*": a string of every accepted character matches
    # exactly when each of them is in the class.
    assert document("".join(accepted))
    assert [c for c in refused if document(c)] == []
    assert {"\x1b", "\n", "\u202e", "\u200b", "\u2028", "\xa0"} <= set(refused)
    assert {" ", "é", "中", "\U0001f642", "\ue000"} <= set(accepted)


@pytest.mark.parametrize(
    "field, value",
    [
        # Python's "$" also matches before a final newline; the document's does not.
        ("Name", "web\n"),
        ("Host", "db.internal\n"),
        ("Target", "db:5432\n"),
        ("InternalUrl", "http://x/\n"),
        ("HealthPath", "/healthz\n"),
        # Python's [0-9] is ASCII either way, but int() reads other digits: the pattern decides.
        ("Target", "db:\u0665\u0664\u0663\u0662"),
        ("Host", "fe80::1%eth0"),
        ("Target", "[10.0.0.5]:22"),
        ("Host", "a.."),
        ("InternalUrl", "http://x:0/"),
        ("InternalUrl", "http://user:pw@x/"),
        # A health path names no host: a network-path reference, a backslash read as "/", a URL.
        ("HealthPath", "//127.0.0.1:19003/x"),
        ("HealthPath", "//"),
        ("HealthPath", "/\\127.0.0.1/x"),
        ("HealthPath", "/a\\b"),
        ("HealthPath", "http://127.0.0.1/x"),
        ("HealthPath", "healthz"),
        ("HealthPath", "/a b"),
        ("HealthPath", "/a\tb"),
        ("HealthPath", "/#x"),
        ("HealthPath", "/h\u00e9"),
        ("HealthPath", "/" + "x" * validate.MAX_HEALTH_PATH),
    ],
)
def test_the_document_and_the_server_refuse_the_same_odd_values(field, value):
    check = {
        "Name": validate.name,
        "Host": validate.host,
        "Target": validate.target,
        "InternalUrl": validate.internal_url,
        "HealthPath": validate.health_path,
    }[field]
    assert not _document_accepts(field)(value)
    assert not _server_accepts(check, value)


def _drawn(pattern: str, field: str):
    """Values drawn from a validate pattern (as the document's generators do), kept to the field's other limits."""
    return st.from_regex(re.compile(pattern), fullmatch=True).filter(_document_accepts(field))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        _drawn(validate.NAME_PATTERN, "Name").map(lambda v: (validate.name, v)),
        _drawn(validate.HOST_PATTERN, "Host").map(lambda v: (validate.host, v)),
        _drawn(validate.TARGET_PATTERN, "Target").map(lambda v: (validate.target, v)),
        _drawn(validate.INTERNAL_URL_PATTERN, "InternalUrl").map(lambda v: (validate.internal_url, v)),
        _drawn(validate.HEALTH_PATH_PATTERN, "HealthPath").map(lambda v: (validate.health_path, v)),
    )
)
def test_what_the_document_allows_the_server_accepts(drawn):
    check, value = drawn
    check(value)


@st.composite
def ipv6_spellings(draw) -> tuple[ipaddress.IPv6Address, str]:
    """An IPv6 address in any of its spellings: "::" for any run of zero groups, any case, an IPv4 tail."""
    address = draw(st.ip_addresses(v=6))
    groups = [f"{int.from_bytes(address.packed[i:i + 2], 'big'):x}" for i in range(0, 16, 2)]
    groups = [g.zfill(draw(st.integers(len(g), 4))) for g in groups]
    tail = []
    if draw(st.booleans()):
        tail = [str(ipaddress.IPv4Address(address.packed[12:]))]
        groups = groups[:6]
    zeros = [i for i, g in enumerate(groups) if int(g, 16) == 0]
    text = ":".join(groups + tail)
    if zeros and draw(st.booleans()):
        start = draw(st.sampled_from(zeros))
        end = start
        while end + 1 < len(groups) and int(groups[end + 1], 16) == 0 and draw(st.booleans()):
            end += 1
        text = ":".join(groups[:start]) + "::" + ":".join(groups[end + 1 :] + tail)
    return address, "".join(c.upper() if draw(st.booleans()) else c for c in text)


@settings(max_examples=500, deadline=None)
@given(ipv6_spellings())
def test_every_spelling_of_an_ipv6_address_is_allowed(spelled):
    address, text = spelled
    assert _document_accepts("Host")(text), text
    assert validate.host(text) == str(address)
    assert validate.target(f"[{text}]:22") == f"[{address}]:22"


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(["0", "1", "ff", "FFFF", "12345", ":", "::", ".", "1.2.3.4", "256.1.1.1", "01.2.3.4"]), max_size=12))
def test_the_ipv6_pattern_is_exactly_what_ipaddress_reads(tokens):
    text = "".join(tokens)
    try:
        ipaddress.IPv6Address(text)
        parsed = True
    except ValueError:
        parsed = False
    assert bool(re.fullmatch(validate.IPV6_PATTERN, text)) == parsed, text


@pytest.mark.parametrize(
    "value, why",
    [
        ("//127.0.0.1:19003/x", "two slashes"),
        ("/\\evil/x", "two slashes"),
        ("/a\\b", "backslash"),
        ("http://intranet/healthz", "not a path"),
        ("healthz", "not a path"),
        ("/a b", "space"),
        ("/" + "x" * validate.MAX_HEALTH_PATH, "longer than"),
        (7, "not text"),
    ],
)
def test_a_refused_health_path_says_why_in_one_line(value, why):
    with pytest.raises(validate.Invalid) as info:
        validate.health_path(value)
    message = str(info.value)
    assert why in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("value", ["/", "/healthz", "/a//b", "/h?next=//x&y=1", "/?q", "/-/ready", "/%2F%2Fx"])
def test_plain_health_paths_are_accepted(value):
    assert validate.health_path(value) == value and _document_accepts("HealthPath")(value)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=st.sampled_from(["/", "\\", "a", "?", "#", " ", ":", "@", ".", "%", "\x7f", "\u00e9", "h"]), max_size=8))
def test_the_connector_refuses_exactly_what_the_server_refuses(value):
    """connector/health.py reads the path again before dialing, with its own pattern: both agree,
    and what they take is GET on the app's origin."""
    server_ok = _server_accepts(validate.health_path, value)
    assert (health.health_path_problem(value) is None) == server_ok == _document_accepts("HealthPath")(value), value
    if server_ok:
        app = {"proto": "http", "target": "intranet:8443", "internal_url": "https://intranet:8443/app/", "health_path": value}
        assert health.health_url(app).startswith("https://intranet:8443/")
        assert yarl.URL(health.health_url(app), encoded=True).raw_authority == "intranet:8443"
