"""The admin center's logic without a server: signed sessions, CSRF and origin checks, the
store's bounded signed-out list, the sample and log rings, paging."""

from __future__ import annotations

import logging

import pytest

from backhaul.center import adminlog, csrf, guard, sessions, views
from backhaul.center.samples import ByteSamples, polyline
from backhaul.config import AdminCenterSettings
from backhaul.store import open_store

KEY_HEX = "11" * 32
ADMIN = "a" * 64


def key() -> bytes:
    return sessions.mac_key(KEY_HEX, ADMIN)


def test_a_cookie_verifies_until_it_expires_and_not_after_sign_out():
    session, cookie = sessions.issue(key(), "admin token", 1000.0, 60.0)
    assert sessions.verify(key(), cookie, 1059.0, {}) == session
    with pytest.raises(sessions.Refused) as exc:
        sessions.verify(key(), cookie, 1060.0, {})
    assert exc.value.code == "session_expired"
    with pytest.raises(sessions.Refused) as exc:
        sessions.verify(key(), cookie, 1001.0, {session.id: 1060.0})
    assert exc.value.code == "signed_out"


@pytest.mark.parametrize("change", ["store_key", "admin_token"])
def test_a_new_store_key_or_admin_token_ends_every_session(change):
    _, cookie = sessions.issue(key(), "x", 1000.0, 60.0)
    other = sessions.mac_key("22" * 32, ADMIN) if change == "store_key" else sessions.mac_key(KEY_HEX, "b" * 64)
    with pytest.raises(sessions.Refused) as exc:
        sessions.verify(other, cookie, 1001.0, {})
    assert exc.value.status == 401


@pytest.mark.parametrize("cookie", ["", "v1", "v2.a.b", "v1.a.b", "v1..", "v1.%%%.x", "x" * 5000])
def test_malformed_cookies_are_refused(cookie):
    with pytest.raises(sessions.Refused) as exc:
        sessions.verify(key(), cookie, 0.0, {})
    assert exc.value.status == 401


def test_a_tampered_payload_is_refused():
    _, cookie = sessions.issue(key(), "x", 1000.0, 60.0)
    _, longer = sessions.issue(key(), "x", 1000.0, 10**9)
    forged = ".".join([cookie.split(".")[0], longer.split(".")[1], cookie.split(".")[2]])
    with pytest.raises(sessions.Refused):
        sessions.verify(key(), forged, 1001.0, {})


def test_csrf_token_is_per_session_and_checked():
    one, _ = sessions.issue(key(), "x", 0.0, 60.0)
    two, _ = sessions.issue(key(), "x", 0.0, 60.0)
    token = sessions.csrf_token(key(), one)
    sessions.check_csrf(key(), one, token)
    for presented in (None, "", sessions.csrf_token(key(), two), token[:-1], token + "x" * 500):
        with pytest.raises(sessions.Refused) as exc:
            sessions.check_csrf(key(), one, presented)
        assert exc.value.status == 403


@pytest.mark.parametrize(
    "headers, ok",
    [
        ({}, True),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "https://relay.example:8443"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Sec-Fetch-Site": "none"}, False),
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "http://relay.example:8443"}, False),
        ({"Origin": "https://relay.example:9999"}, False),
        ({"Origin": "null"}, False),
        ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, True),
        ({"Origin": "null", "Sec-Fetch-Site": "cross-site"}, False),
    ],
)
def test_origin_checks(headers, ok):
    if ok:
        csrf.check_origin(headers, "relay.example:8443")
    else:
        with pytest.raises(sessions.Refused) as exc:
            csrf.check_origin(headers, "relay.example:8443")
        assert exc.value.code == "cross_site_refused"


def test_authorize_needs_csrf_only_for_changes():
    session, cookie = sessions.issue(key(), "x", 0.0, 60.0)
    state = (KEY_HEX, {})
    assert guard.authorize(state, ADMIN, cookie, "GET", {}, "h:1", 1.0)[0] == session
    with pytest.raises(sessions.Refused):
        guard.authorize(state, ADMIN, cookie, "DELETE", {}, "h:1", 1.0)
    token = sessions.csrf_token(key(), session)
    assert guard.authorize(state, ADMIN, cookie, "DELETE", {sessions.CSRF_HEADER: token}, "h:1", 1.0)[0] == session
    assert guard.authorize(state, ADMIN, cookie, "POST", {}, "h:1", 1.0, form_csrf=token)[0] == session
    with pytest.raises(sessions.Refused):
        guard.authorize(state, None, cookie, "GET", {}, "h:1", 1.0)


def test_the_signed_out_list_is_bounded_and_a_full_list_replaces_the_key(store_location):
    now = [1000.0]
    store = open_store(store_location, clock=lambda: now[0])
    try:
        key_hex, ended = store.center_state()
        assert ended == {} and store.center_state()[0] == key_hex  # made once, then kept
        assert store.center_sign_out("a", 1100.0, 3) is False
        assert store.center_sign_out("b", 1200.0, 3) is False
        now[0] = 1150.0  # "a" would have expired by now: it leaves the list
        assert store.center_sign_out("c", 1300.0, 3) is False
        assert set(store.center_state()[1]) == {"b", "c"}
        assert store.center_sign_out("d", 1300.0, 3) is False
        assert store.center_sign_out("e", 1300.0, 3) is True  # full: a new key ends them all
        new_key, ended = store.center_state()
        assert new_key != key_hex and ended == {}
    finally:
        store.close()


def test_samples_are_bounded_and_rated():
    settings = AdminCenterSettings(samples=4, sample_interval=5.0, max_sampled_connectors=2)
    samples = ByteSamples(settings)
    for i in range(10):
        samples.record(i * 5.0, [("a", i * 500), ("b", i * 1000), ("c", 7)])
        samples.record(i * 5.0 + 1, [("a", 10**9)])  # too soon: ignored
    assert len(samples.totals) == 4 and set(samples.per_connector) == {"a", "b"}
    assert all(len(ring) == 4 for ring in samples.per_connector.values())
    assert samples.rate_of("a") == 100.0 and samples.rate_of("b") == 200.0 and samples.rate_of("c") is None
    assert samples.chart_of("a").count(",") == 3
    samples.record(100.0, [("b", 0)])  # a counter reset (connector restarted) is 0, and "a" is gone
    assert samples.rate_of("b") == 0.0 and "a" not in samples.per_connector
    assert polyline([1.0], 10) == ""


def test_the_log_ring_is_bounded_filtered_and_newest_first(tmp_path):
    ring = adminlog.RecordRing(3)
    logger = logging.getLogger("backhaul.test_center")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    try:
        for i in range(5):
            logger.info("step %d", i, extra={"app": f"app{i}"})
        logger.warning("bad thing", extra={"app": "x"})
        logging.getLogger("backhaul.stream").warning("per stream: never in the admin log")
    finally:
        logger.removeHandler(ring)
    assert len(ring.entries) == 3
    found, source = adminlog.entries(ring, tmp_path, 100, 1024)
    assert [e["msg"] for e in found] == ["bad thing", "step 4", "step 3"] and "worker" in source
    assert [e["msg"] for e in adminlog.entries(ring, tmp_path, 100, 1024, "warning")[0]] == ["bad thing"]
    assert [e["msg"] for e in adminlog.entries(ring, tmp_path, 100, 1024, "", "APP3")[0]] == ["step 3"]
    assert [e["msg"] for e in adminlog.entries(ring, None, 2, 1024)[0]] == ["bad thing", "step 4"], "at most limit"


def test_an_admin_log_file_is_read_from_its_end_only(tmp_path):
    lines = [f'{{"ts": {i}, "level": "info", "msg": "line {i}"}}' for i in range(1000)]
    (tmp_path / "admin.log").write_text("\n".join(lines) + "\nnot json\n")
    found, source = adminlog.entries(adminlog.RecordRing(1), tmp_path, 100, 200)
    assert source.endswith("admin.log") and found[0]["msg"] == "line 999", "a line that is not JSON is skipped"
    assert 1 < len(found) < 10, "only the last 200 bytes were read"


def test_paging_is_clamped():
    settings = AdminCenterSettings(page_size=10, max_page_size=20)
    assert views.page_args({"page": "3", "size": "500"}, settings) == (3, 20)
    assert views.page_args({"page": "x", "size": "-1"}, settings) == (1, 1)
    paged = views.paginate(list(range(25)), 9, 10)
    assert paged.page == 3 and paged.pages == 3 and paged.rows == [20, 21, 22, 23, 24] and paged.total == 25
    assert views.paginate([], 1, 10).pages == 1
