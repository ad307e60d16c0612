"""A connector attacking the rollout: another connector's lease, another group's rollout.

A connector's certificate names one connector of one group. With it, the rollout
endpoints let it take its own group's lease and report on its own updates, nothing more:
it cannot renew or release a lease it does not hold (the fencing token is checked against
the caller), and a failure it reports halts its own group only.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_rollout import UpdaterCalls

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


def _group(system, name: str) -> dict:
    (group,) = [g for g in system.api("/v1/rollout") if g["group"] == name]
    return group


def test_a_connector_cannot_touch_another_connectors_lease_or_group(system):
    system.admin("group", "create", "east")
    holder = UpdaterCalls(system, system.register("holder"))
    rogue = UpdaterCalls(system, system.register("rogue", group="east"))
    try:
        # Both groups would refuse a lone connector; let them update without another one up.
        for group in ("default", "east"):
            system.admin("group", "update", group, "--allow-downtime", "yes")
        status, lease = holder.lease()
        assert status == 200 and lease["group"] == "default"
        token = lease["token"]

        # The rogue knows (or guesses) the holder's token: it renews nothing and releases nothing.
        for guess in (token, token + 1, 2**62):
            status, body = rogue.post("/v1/updates/lease/renew", {"token": guess})
            assert status == 409 and body["reason"] == "stale", body
            assert rogue.report("healthy", guess)["released"] is False
        held = _group(system, "default")["lease"]
        assert held is not None and held["token"] == token and held["expires"] == lease["expires"]

        # Its failures halt its own group, never the holder's.
        assert rogue.report("rolled_back", None, reason="forged failure")["halted"] is True
        assert _group(system, "east")["halted"] == "forged failure"
        assert _group(system, "default")["halted"] is None
        # The lease it may take is its own group's, never another's.
        system.admin("rollout", "resume", "--group", "east")
        status, own = rogue.lease()
        assert status == 200 and own["group"] == "east"
        assert _group(system, "default")["lease"]["token"] == token

        # Garbage is refused without a trace in the rollout state.
        for body in ({"version": "9.0", "step": "healthy", "token": "1"}, {"version": "9.0", "step": "drop table"}, {"version": 5, "step": "healthy"}):
            status, answer = rogue.post("/v1/updates/report", body)
            assert status == 400, answer
        assert _group(system, "east")["halted"] is None
    finally:
        holder.close()
        rogue.close()
