"""Which relay nodes a connector worker holds tunnels to (connector.nodes, slots.group_view):
the node list it accepts, the rendezvous choice, the plan while nodes come, go and drain,
and how long a lost node is avoided. No sockets: the decisions are plain functions."""

from __future__ import annotations

import collections
import logging

import pytest

from backhaul import pki
from backhaul.config import Backoff, ClusterSettings, Rehoming
from backhaul.connector.nodes import (
    GroupView,
    NodeAddress,
    NodeStrikes,
    Target,
    choose_nodes,
    parse_nodes,
    plan,
    rank,
)
from backhaul.connector.slots import TunnelRecord, group_view

A, B, C, D = "n-aaaaaaaaaaaa", "n-bbbbbbbbbbbb", "n-cccccccccccc", "n-dddddddddddd"
NODES = {n: NodeAddress(n, f"10.0.0.{i}", 8443) for i, n in enumerate((A, B, C, D), start=1)}
ENROLLED = Target("relay.example", 8443, "relay.example")
CONNECTOR = "c-0123456789ab"


def listed(*ids: str) -> list[NodeAddress]:
    return [NODES[i] for i in ids]


def ready(*reached: str) -> GroupView:
    return GroupView(serving=2, ready=True, lost=False, reached=frozenset(reached))


CONNECTING = GroupView(serving=0, ready=False, lost=False)
LOST = GroupView(serving=0, ready=False, lost=True)


def addr(node: str) -> tuple[str, int]:
    return NODES[node].address


# ---------------------------------------------------------------- the node list


def test_a_node_list_is_checked_entry_by_entry_and_what_is_refused_is_logged(caplog):
    raw = [
        {"id": A, "listen": "10.0.0.1:8443"},
        {"id": "node-1", "listen": "10.0.0.2:8443"},  # not a node id
        {"id": B, "listen": "10.0.0.2"},  # no port
        {"id": C, "listen": "0.0.0.0:8443"},  # a bind-all address nobody can dial
        {"id": D, "listen": "10.0.0.1:8443"},  # the same address twice
        {"id": A, "listen": "10.0.0.9:8443"},  # the same id twice
        "10.0.0.3:8443",
        {"id": B, "listen": "[::1]:9443"},
    ]
    with caplog.at_level(logging.WARNING, "backhaul.connector"):
        nodes = parse_nodes(raw, 64, "hello")
    assert nodes == [NodeAddress(A, "10.0.0.1", 8443), NodeAddress(B, "::1", 9443)]
    assert nodes[1].url == "https://[::1]:9443" and nodes[0].url == "https://10.0.0.1:8443"
    refused = [r for r in caplog.records if r.getMessage() == "relay node entry ignored"]
    assert len(refused) == 6 and all(r.source == "hello" and r.reason for r in refused)


def test_no_list_is_not_an_empty_list():
    assert parse_nodes(None, 64, "hello") is None  # an older relay: keep what is known
    assert parse_nodes({"id": A}, 64, "config") is None  # not a list: refused whole
    assert parse_nodes([], 64, "hello") == []  # a one-node service without a node id


def test_a_node_list_is_bounded():
    raw = [{"id": pki.new_node_id(), "listen": f"10.1.0.{i}:8443"} for i in range(10)]
    assert len(parse_nodes(raw, 4, "config")) == 4
    assert ClusterSettings.max_nodes == 64  # what the worker passes as the bound


# ---------------------------------------------------------------- rendezvous ranking


def test_rank_is_the_same_whatever_order_the_nodes_come_in():
    nodes = listed(A, B, C, D)
    assert rank(CONNECTOR, nodes) == rank(CONNECTOR, list(reversed(nodes)))
    firsts = {rank(f"c-{i:012d}", nodes)[0].id for i in range(50)}
    assert firsts == {A, B, C, D}  # different connectors prefer different nodes


def test_connectors_spread_evenly_and_a_joining_node_moves_only_its_share():
    four = listed(A, B, C, D)
    ids = [f"c-{i:012x}" for i in range(2000)]
    before = {c: rank(c, four)[:2] for c in ids}
    firsts = collections.Counter(pair[0].id for pair in before.values())
    assert all(400 <= count <= 600 for count in firsts.values()), firsts  # 500 each, give or take
    E = NodeAddress("n-eeeeeeeeeeee", "10.0.0.5", 8443)
    after = {c: rank(c, four + [E])[:2] for c in ids}
    changed = [c for c in ids if after[c] != before[c]]
    # A node joining enters the top two of about 2/5 of the connectors; nobody else moves.
    assert 0.3 * len(ids) <= len(changed) <= 0.5 * len(ids)
    assert all(E in after[c] for c in changed)


# ---------------------------------------------------------------- choice


def test_the_choice_keeps_held_nodes_and_fills_by_rank():
    nodes = listed(A, B, C, D)
    best = [n.id for n in rank(CONNECTOR, nodes)]
    assert [n.id for n in choose_nodes(CONNECTOR, nodes, 2, set(), set())] == best[:2]
    worst = best[-1]
    chosen = [n.id for n in choose_nodes(CONNECTOR, nodes, 2, {worst}, set())]
    assert chosen == [worst, best[0]]  # a node that serves stays, even if others rank higher
    # held beyond the count: the best ranked of them stay
    assert [n.id for n in choose_nodes(CONNECTOR, nodes, 1, set(best), set())] == best[:1]


def test_avoided_nodes_are_taken_only_when_nothing_else_is_up():
    nodes = listed(A, B, C)
    best = [n.id for n in rank(CONNECTOR, nodes)]
    chosen = [n.id for n in choose_nodes(CONNECTOR, nodes, 2, {best[0]}, {best[0]})]
    assert chosen == best[1:]  # the held node was lost: two others instead
    chosen = [n.id for n in choose_nodes(CONNECTOR, nodes, 3, set(), {best[1]})]
    assert chosen == [best[0], best[2], best[1]]  # a node that failed beats no node
    assert choose_nodes(CONNECTOR, [], 2, set(), set()) == []


# ---------------------------------------------------------------- the plan


def test_without_a_list_or_with_one_node_only_the_enrolled_address_is_held():
    for nodes in ([], listed(A)):
        decided = plan(CONNECTOR, 2, nodes, ENROLLED, {}, set())
        assert decided.hold == (ENROLLED,) and decided.retire == ()
        decided = plan(CONNECTOR, 2, nodes, ENROLLED, {ENROLLED.address: ready()}, set())
        assert decided.hold == (ENROLLED,) and decided.retire == ()


def test_the_enrolled_address_is_held_until_the_chosen_nodes_are_ready():
    nodes = listed(A, B, C)
    # the load balancer's tunnels reached B: B is kept, one more by rank
    views = {ENROLLED.address: ready(B)}
    decided = plan(CONNECTOR, 2, nodes, ENROLLED, views, set())
    chosen = [t.address for t in decided.hold if t != ENROLLED]
    assert addr(B) in chosen and len(chosen) == 2 and ENROLLED in decided.hold and decided.retire == ()
    assert all(t.server_hostname == t.host for t in decided.hold if t != ENROLLED)  # each node's own name
    views.update({a: CONNECTING for a in chosen})
    assert plan(CONNECTOR, 2, nodes, ENROLLED, views, set()).retire == ()
    views[chosen[0]] = ready(B)
    assert plan(CONNECTOR, 2, nodes, ENROLLED, views, set()).retire == ()  # one of two is not enough
    views[chosen[1]] = ready()
    decided = plan(CONNECTOR, 2, nodes, ENROLLED, views, set())
    assert ENROLLED not in decided.hold and decided.retire == (ENROLLED.address,)
    assert {t.address for t in decided.hold} == set(chosen)


def test_an_enrolled_address_that_is_a_node_is_that_nodes_group():
    nodes = listed(A, B, C)
    enrolled = Target(*addr(A), NODES[A].host)
    decided = plan(CONNECTOR, 2, nodes, enrolled, {addr(A): ready(A)}, set())
    holds = [t.address for t in decided.hold]
    assert holds[0] == addr(A) and len(holds) == 2 and decided.retire == ()  # A kept, no third group


def test_a_node_that_left_the_list_is_let_go_only_once_its_replacement_is_ready():
    held = {addr(A): ready(A), addr(B): ready(B)}
    decided = plan(CONNECTOR, 2, listed(A, B, C, D), ENROLLED, held, set())
    assert {t.address for t in decided.hold} == {addr(A), addr(B)} and decided.retire == ()  # stable
    nodes = listed(A, C, D)  # B went from the list, its tunnels still serve
    decided = plan(CONNECTOR, 2, nodes, ENROLLED, held, set())
    new = [t.address for t in decided.hold if t.address not in (addr(A), ENROLLED.address)]
    assert len(new) == 1 and addr(A) in [t.address for t in decided.hold]
    assert decided.retire == ()  # B keeps serving while the replacement connects
    views = {**held, new[0]: ready()}
    decided = plan(CONNECTOR, 2, nodes, ENROLLED, views, set())
    assert decided.retire == (addr(B),) and ENROLLED not in decided.hold


def test_a_lost_node_is_replaced_and_its_group_retired_at_once():
    nodes = listed(A, B, C)
    views = {addr(A): ready(A), addr(B): LOST}
    decided = plan(CONNECTOR, 2, nodes, ENROLLED, views, {B})
    holds = {t.address for t in decided.hold}
    assert addr(A) in holds and addr(C) in holds and addr(B) not in holds
    assert decided.retire == (addr(B),)  # it serves nothing: nothing to wait for
    assert ENROLLED in decided.hold  # C is not ready yet: the enrolled address is the net meanwhile


def test_a_draining_node_keeps_its_tunnels_until_the_replacement_is_ready():
    # B sent GOAWAY: lost, though its tunnels are still up finishing their streams
    views = {addr(A): ready(A), addr(B): GroupView(serving=0, ready=False, lost=True)}
    decided = plan(CONNECTOR, 2, listed(A, B, C), ENROLLED, views, {B})
    assert addr(C) in {t.address for t in decided.hold}
    assert decided.retire == (addr(B),)  # GOAWAY'd tunnels are not serving; streams still finish


def test_a_new_node_is_used_only_when_fewer_than_wanted_are_held():
    views = {addr(A): ready(A), addr(B): ready(B)}
    decided = plan(CONNECTOR, 2, listed(A, B, D), ENROLLED, views, set())
    assert {t.address for t in decided.hold} == {addr(A), addr(B)}
    decided = plan(CONNECTOR, 3, listed(A, B, D), ENROLLED, views, set())
    assert {t.address for t in decided.hold} >= {addr(A), addr(B), addr(D)}


def test_when_every_node_failed_all_are_dialed_still_and_the_enrolled_address_too():
    views = {addr(A): LOST, addr(B): LOST}
    decided = plan(CONNECTOR, 2, listed(A, B), ENROLLED, views, {A, B})
    assert {t.address for t in decided.hold} == {addr(A), addr(B), ENROLLED.address}
    assert decided.retire == ()


# ---------------------------------------------------------------- strikes


def test_a_lost_node_is_avoided_for_a_while_that_doubles_and_is_capped():
    strikes = NodeStrikes(Backoff(initial=5.0, maximum=20.0, factor=2.0), limit=64)
    assert strikes.strike(A, now=100.0) == 105.0
    assert strikes.avoided(104.9) == {A} and strikes.avoided(105.0) == set()
    assert strikes.strike(A, now=200.0) == 210.0
    assert strikes.strike(A, now=300.0) == 320.0
    assert strikes.strike(A, now=400.0) == 420.0  # capped
    strikes.clear(A)  # it answered a hello: good again, and the next loss counts from one
    assert strikes.avoided(400.0) == set() and strikes.strike(A, now=500.0) == 505.0


def test_strikes_are_bounded():
    strikes = NodeStrikes(Rehoming().avoid, limit=3)
    for i, node in enumerate((A, B, C, D)):
        strikes.strike(node, now=float(i))
    assert len(strikes) == 3 and strikes.avoided(3.0) == {B, C, D}  # the first to end went first


# ---------------------------------------------------------------- a group's view from its tunnels


def record(slot: int, relay_worker=0, node=A, hello=True, retiring=False, goaway=False) -> TunnelRecord:
    r = TunnelRecord(slot, closed=None)
    r.hello, r.relay_worker, r.node, r.retiring, r.relay_goaway = hello, relay_worker, node, retiring, goaway
    return r


def test_a_group_is_ready_when_it_covers_every_relay_worker_of_its_node():
    view = group_view([record(0, 0), record(1, 1)], relay_workers=2, failures=0, goaway=False, failed_dials=2)
    assert (view.serving, view.ready, view.lost, view.reached) == (2, True, False, frozenset({A}))
    view = group_view([record(0, 0), record(1, 0)], relay_workers=2, failures=0, goaway=False, failed_dials=2)
    assert not view.ready and not view.lost
    view = group_view([record(0, 0), record(1, 1, goaway=True)], 2, 0, True, 2)
    assert not view.ready and not view.lost  # one tunnel left: not lost yet


def test_a_group_is_lost_after_goaway_or_failed_dials_with_nothing_serving():
    assert group_view([record(0, goaway=True)], 1, 0, True, 2).lost  # the node drains
    assert not group_view([], 1, 1, False, 2).lost  # one failed dial: maybe a blink
    assert group_view([], 1, 2, False, 2).lost
    assert not group_view([record(0, hello=False)], 1, 0, False, 2).lost  # still connecting
    assert group_view([record(0, retiring=True)], 1, 3, False, 2).lost


@pytest.mark.parametrize("bad", [0, -1])
def test_rehoming_limits_are_checked(bad):
    with pytest.raises(ValueError):
        Rehoming(failed_dials=bad)
