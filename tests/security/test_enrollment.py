"""Enrollment as an attacker tries it: bogus, expired and revoked tokens are refused, each
refusal is logged with the peer's address (never the token), and an address that keeps
trying is braked with 429 and Retry-After (config.EnrollLimits)."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

from backhaul.config import EnrollLimits

from tests.e2e.harness import wait_until

pytestmark = pytest.mark.e2e


def _enroll(system, token: str) -> tuple[int, dict, dict]:
    """POST /v1/enroll straight, as a script would (no CSR needed to be refused)."""
    ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", system.port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/v1/enroll", body=json.dumps({"token": token, "csr": "x"}), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        conn.close()


def _one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backhaul: "), result.stderr
    return lines[0]


def test_revoked_token_enrolls_nothing_and_bad_tokens_are_logged_then_braked(system, tmp_path):
    budget = EnrollLimits().burst
    # An admin lists and revokes a token: it never shows the secret, and enrolls nothing after.
    token = system.token(uses=5)
    (listed,) = system.admin_json("token", "list")
    assert set(listed) == {"id", "group", "uses_left", "expires", "created"} and listed["uses_left"] == 5
    assert token not in system.admin("token", "list").stdout
    assert listed["id"] in system.admin("token", "revoke", listed["id"]).stdout
    assert system.admin_json("token", "list") == []
    refused = system.cli(
        "connector", "register", "--service", system.url, "--token", token, "--ca-sha256", system.ca_sha256,
        "--state-dir", str(tmp_path / "revoked"), check=False,
    )
    assert "unknown, expired or used up" in _one_line_error(refused)
    assert not (tmp_path / "revoked" / "connector.json").exists()
    assert "token list" in _one_line_error(system.admin("token", "revoke", listed["id"], check=False))
    # The rest of this address's budget on bogus tokens; the revoked one above spent one.
    bogus = "bht_" + "A" * 43
    for _ in range(budget - 1):
        status, body, _ = _enroll(system, bogus)
        assert status == 403 and body["error"] == "enrollment_refused", body
    # Beyond the budget: 429 with Retry-After, whatever the token (a good one included).
    good = system.token()
    for _ in range(3):
        status, body, headers = _enroll(system, good)
        assert status == 429 and body["error"] == "too_many_attempts", body
        assert int(headers["Retry-After"]) >= 1
    assert system.admin_json("token", "list")[0]["uses_left"] == 1  # the braked attempts used nothing

    def logged() -> list[dict]:
        return system.relay.log_entries("enrollment refused: bad, expired or used-up token")

    wait_until(lambda: len(logged()) >= budget, 10, "the relay to log every refused enrollment")
    entries = logged()
    assert len(entries) == budget
    assert {(e["level"], e["peer"], e["reason"]) for e in entries} == {("warning", "127.0.0.1", "unknown")}
    braked = system.relay.log_entries("enrollments refused from this address for a while: too many bad tokens")
    assert len(braked) == 1 and braked[0]["peer"] == "127.0.0.1" and braked[0]["level"] == "warning"
    log = system.relay.log()
    for secret in (token, bogus, good):
        assert secret not in log
