"""Which offered releases the updater takes on its own, and how it reads the relay's offer."""

from __future__ import annotations

import base64

import pytest

from backhaul.config import UpdaterLimits
from backhaul.updater.layout import Layout, State, UpdateRefused
from backhaul.updater.relay import Offer, parse_offer
from backhaul.updater.runner import Updater

pytestmark = pytest.mark.codec_independent


def _offer(**changes) -> Offer:
    fields = {"version": "1.1", "manifest": b"{}", "signature": b"s" * 64, "auto": True, "rollout": {}}
    return Offer(**{**fields, **changes})


@pytest.fixture
def updater(tmp_path):
    return Updater(Layout(tmp_path), tmp_path, UpdaterLimits(), connector=None)


def test_an_auto_release_is_taken(updater):
    assert updater._skip(_offer(), State(), manual=False) is None


@pytest.mark.parametrize(
    "offer, state, why",
    [
        (_offer(auto=False), State(), "not auto"),
        (_offer(), State(failed=["1.1"]), "failed here before"),
        (_offer(rollout={"paused": True, "halted": None}), State(), "paused"),
        (_offer(rollout={"paused": False, "halted": "1.1 rolled back on c2"}), State(), "halted: 1.1 rolled back on c2"),
    ],
)
def test_what_the_updater_leaves_alone_unless_applied_by_hand(updater, offer, state, why):
    assert updater._skip(offer, state, manual=False).reason == why
    assert updater._skip(offer, state, manual=True) is None


def test_a_manual_only_release_is_said_once_not_at_every_check(updater, caplog):
    caplog.set_level("INFO", logger="backhaul.updater")
    for _ in range(5):
        updater._skip(_offer(auto=False), State(), manual=False)
    assert len([r for r in caplog.records if "not marked for automatic update" in r.getMessage()]) == 1


def test_the_relays_offer_is_parsed_and_checked():
    assert parse_offer({"release": None}) is None
    offer = parse_offer({
        "release": {"version": "1.1", "manifest": base64.b64encode(b"m").decode(), "signature": base64.b64encode(b"s").decode(), "auto": True},
        "rollout": {"paused": False, "halted": None},
    })
    assert (offer.version, offer.manifest, offer.signature, offer.auto, offer.rollout["paused"]) == ("1.1", b"m", b"s", True, False)
    for bad in ({}, {"release": {"version": "../x", "manifest": "", "signature": ""}}, {"release": {"version": "1.1", "manifest": "!!", "signature": ""}}):
        with pytest.raises(UpdateRefused):
            parse_offer(bad)
