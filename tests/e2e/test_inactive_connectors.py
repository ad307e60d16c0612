"""Inactive connectors end to end: the status grace, when a stopped connector became
inactive and when it goes, and its removal by housekeeping, set by `service run` flags."""

from __future__ import annotations

import time

import pytest

from backhaul.admin.tables import when

from .harness import running_relay, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]

#: Short enough for a test, long enough that the list read right after the tunnels went falls
#: inside it on a loaded machine (a read takes milliseconds).
GRACE = 4.0
#: Unseen this long (no heartbeat, no tunnel), housekeeping removes it.
REMOVE_AFTER = 8.0
HOUSEKEEPING = 0.5


def test_a_stopped_connector_is_inactive_after_the_grace_and_removed_after_the_period(tmp_path):
    flags = (
        "--inactive-grace", str(GRACE), "--remove-inactive-after", str(REMOVE_AFTER),
        "--housekeeping-interval", str(HOUSEKEEPING),
    )
    with running_relay(tmp_path, relay_args=flags) as system:
        system.start_connector("gone", tunnels=2)
        system.wait_tunnels("gone", 2)
        entry = system.connector_info("gone")
        assert (entry["status"], entry["inactive_since"], entry["removal_at"]) == ("active", None, None)

        stopped = time.time()
        system.connectors["gone"].stop()
        system.wait_tunnels("gone", 0)
        # Its tunnels are gone, yet within the grace it is listed active (a redial would be back by now).
        entry = system.connector_info("gone")
        assert (entry["status"], entry["inactive_since"], entry["removal_at"]) == ("active", None, None), entry

        entry = wait_until(
            lambda: (lambda c: c if c["status"] == "inactive" else None)(system.connector_info("gone")),
            GRACE + 10, "the stopped connector to be listed inactive after the grace", interval=0.2,
        )
        assert stopped - 1 <= entry["inactive_since"] <= time.time()
        assert time.time() >= entry["inactive_since"] + GRACE - 0.5  # not before the grace ran out
        assert entry["removal_at"] == pytest.approx(entry["last_seen"] + REMOVE_AFTER)
        # The table shows both dates, the JSON output both fields.
        (line,) = [row for row in system.admin("connector", "list").stdout.splitlines() if " gone " in row]
        assert when(entry["inactive_since"]) in line and when(entry["removal_at"]) in line
        header = system.admin("connector", "list").stdout.splitlines()[0]
        assert "INACTIVE SINCE" in header and "REMOVED ON" in header
        (listed,) = [c for c in system.admin_json("connector", "list") if c["name"] == "gone"]
        assert (listed["inactive_since"], listed["removal_at"]) == (entry["inactive_since"], entry["removal_at"])

        # Housekeeping removes it once removal_at has passed, not before.
        while time.time() < entry["removal_at"] - 1.0:  # bounded by removal_at
            assert system.connector_info("gone"), "removed before its removal date"
            time.sleep(0.2)
        wait_until(
            lambda: system.connector_info("gone") == {}, REMOVE_AFTER + 15, "housekeeping to remove the connector",
            interval=0.2,
        )
        removed = system.relay.log_entries("removed unseen connectors")
        assert [e["connectors"] for e in removed] == [[entry["id"]]]
