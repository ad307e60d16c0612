"""relay/peering.py and relay/bridge.py: streams carried to another node over a
relay-to-relay link, with real TLS (node certificates from one CA) on 127.0.0.1.

Each node is the linking part of a relay worker (tests/unit/peer_nodes.py); its connector is
a bare mux Session on one end of a socketpair that the test answers for. A user stream is an
Opening from the node's StreamOpener with a recording endpoint, as an edge's would be.
"""

from __future__ import annotations

import asyncio

import pytest

from backhaul import pki
from backhaul.config import FlowControl, PeeringLimits
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from backhaul.relay.opening import CannotOpen
from backhaul.relay.peering import PeerDirectory, PeerLink
from backhaul.relay.routing import TunnelRecord

from .peer_nodes import APP, FLOW_APP, Node, node_dirs
from .test_opening import Figures, RetryingEndpoint
from .test_udp_flows import FarEnd


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 30))


async def settle(predicate, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def nodes(tmp_path, count: int, **kwargs) -> list[Node]:
    return [await Node(d, **kwargs).listen() for d in node_dirs(tmp_path, count)]


class UserEnd(RetryingEndpoint):
    """A user stream reduced to the opener's rules (retries), noting the bytes that come back."""

    def __init__(self, opening) -> None:
        super().__init__(opening)
        self.received = bytearray()
        self.ended = False

    def on_data(self, data, end):
        self.received += data
        self.opening.tunnel.consumed(self.stream_id, len(data))
        if end:
            self.ended = True

    def on_end(self):
        self.ended = True

    def open(self) -> int:
        self.stream_id = self.opening.open(self)
        return self.stream_id

    def on_rejected(self, code, reason):
        self.events.append(("rejected", code))
        if self.opening.retryable(code):
            try:
                self.open()
                return
            except CannotOpen:
                pass
        self.opening.done(code)


def user(node: Node, app=APP, label: str = "s-1") -> UserEnd:
    opening = node.opener.begin(app, app.proto, "192.0.2.7:4000", label, figures=Figures(app.name))
    return UserEnd(opening)


async def opened(far: FarEnd, count: int = 1) -> mux.StreamOpened:
    await far.until(lambda seen: len(far.of(mux.StreamOpened)) >= count, "the OPEN at the connector")
    return far.of(mux.StreamOpened)[count - 1]


async def stop(*stopping: Node) -> None:
    for node in stopping:
        await node.stop()


async def forwarded(tmp_path, app=APP, **kwargs):
    """Nodes A and B, a connector on B only, and a user stream on A carried to it and
    accepted: (a, b, the connector, the user's end, the connector's StreamOpened)."""
    a, b = await nodes(tmp_path, 2, **kwargs)
    remote = await b.connector()
    a.knows(b)
    end = user(a, app=app)
    end.open()
    got = await opened(remote)
    remote.session.accept_stream(got.stream_id)
    await remote.flush()
    await settle(lambda: end.accepted, "OPEN_OK")
    return a, b, remote, end, got


def test_a_stream_with_no_local_tunnel_is_carried_to_the_node_holding_one_and_spliced_both_ways(tmp_path):
    async def main():
        a, b = await nodes(tmp_path, 2)
        connector = await b.connector()
        a.knows(b)
        end = user(a, label="s-77")
        end.open()
        link = end.opening.tunnel
        assert isinstance(link.info, PeerLink) and link.info.node_id == b.node_id and link.info.dialed
        got = await opened(connector)
        assert got.meta["app"] == "web" and got.meta["target"] == APP.target and got.meta["id"] == "s-77"
        assert got.meta["client"] == "192.0.2.7:4000" and got.meta["proto"] == "tcp"
        assert not end.accepted, "A hears OPEN_OK only once B's connector answered"
        connector.session.accept_stream(got.stream_id)
        await connector.flush()
        await settle(lambda: end.accepted, "OPEN_OK through the link")

        link.send(end.stream_id, b"hello over two hops")
        await connector.until(
            lambda seen: b"".join(e.data for e in connector.of(mux.DataReceived)) == b"hello over two hops", "the bytes"
        )
        connector.session.send_data(got.stream_id, b"and back", end=True)
        await connector.flush()
        await settle(lambda: end.received == b"and back" and end.ended, "the answer and its FIN")
        link.end(end.stream_id)
        await connector.until(lambda seen: connector.of(mux.StreamEnded) or any(
            e.end for e in connector.of(mux.DataReceived)), "the user's FIN at the connector")
        await settle(lambda: not b.links.accepted or all(t.load == 0 for t in b.links.accepted), "the bridge to finish")
        figures = b.metrics.apps["web"]
        assert figures.opened == 1 and figures.live == set() and figures.to_app == len(b"hello over two hops")
        assert figures.to_client == len(b"and back") and figures.failed == {}
        assert b.metrics.events["peer_streams_bridged"] == 1 and a.metrics.events["peer_links_dialed"] == 1
        # the link stays for the next stream: no second dial
        second = user(a, label="s-78")
        second.open()
        assert second.opening.tunnel is link
        await stop(a, b)

    run(main())


def test_a_local_tunnel_is_preferred_and_no_link_is_dialed(tmp_path):
    async def main():
        a, b = await nodes(tmp_path, 2)
        local = await a.connector()
        await b.connector()
        a.knows(b)
        for i in range(5):
            end = user(a, label=f"s-{i}")
            end.open()
            assert isinstance(end.opening.tunnel.info, TunnelRecord)
        await opened(local, 5)
        assert a.links.links == {} and "peer_links_dialed" not in a.metrics.events
        await stop(a, b)

    run(main())


def test_when_the_local_tunnels_refuse_the_stream_goes_to_a_peer_within_the_attempts(tmp_path):
    async def main():
        a, b = await nodes(tmp_path, 2)
        local = await a.connector()
        remote = await b.connector()
        a.knows(b)
        end = user(a)
        end.open()
        first = await opened(local)
        local.session.reject_stream(first.stream_id, ErrorCode.REFUSED_STREAM, "full")
        await local.flush()
        got = await opened(remote)
        remote.session.accept_stream(got.stream_id)
        await remote.flush()
        await settle(lambda: end.accepted, "OPEN_OK from the peer's connector")
        assert end.events == [("rejected", ErrorCode.REFUSED_STREAM), ("accepted",)]
        assert [type(t.info) for t in end.opening.tried] == [TunnelRecord, PeerLink]
        await stop(a, b)

    run(main())


def test_a_connectors_refusal_reaches_the_user_node_with_its_code(tmp_path):
    async def main():
        a, b = await nodes(tmp_path, 2)
        remote = await b.connector()
        a.knows(b)
        end = user(a)
        end.open()
        got = await opened(remote)
        remote.session.reject_stream(got.stream_id, ErrorCode.CONNECT_REFUSED, "nobody listens")
        await remote.flush()
        await settle(lambda: end.events, "the refusal")
        assert end.events == [("rejected", ErrorCode.CONNECT_REFUSED)]
        assert a.metrics.apps["web"].failed == {"CONNECT_REFUSED": 1}
        assert b.metrics.apps["web"].failed == {"CONNECT_REFUSED": 1}

        # B's only connector is full: B retries locally (nothing else), then tells A it may retry;
        # A has nowhere else to go and refuses within its attempts.
        again = user(a, label="s-2")
        again.open()
        got = await opened(remote, 2)
        remote.session.reject_stream(got.stream_id, ErrorCode.REFUSED_STREAM, "full")
        await remote.flush()
        await settle(lambda: again.events, "the refusal")
        assert again.events == [("rejected", ErrorCode.REFUSED_STREAM)]
        assert len(again.opening.tried) == 1, "a node is not offered the same stream twice"
        await stop(a, b)

    run(main())


def test_an_unknown_app_or_a_wrong_kind_is_refused_by_the_far_node(tmp_path):
    async def main():
        a, b = await nodes(tmp_path, 2)
        await b.connector()
        a.knows(b)
        b.links.set_apps([])  # B has not seen the app (yet)
        end = user(a)
        end.open()
        await settle(lambda: end.events, "the refusal")
        assert end.events == [("rejected", ErrorCode.UNKNOWN_APP)]
        b.links.set_apps([APP, FLOW_APP])
        link = a.links.links[b.node_id]
        wrong = user(a, label="s-2")
        wrong.opening.proto = "udp"  # a TCP app opened as a UDP flow
        wrong.open()
        await settle(lambda: wrong.events, "the refusal")
        assert wrong.events == [("rejected", ErrorCode.PROTOCOL_ERROR)]
        assert b.metrics.events["peer_streams_refused"] == 2 and link.usable
        await stop(a, b)

    run(main())


def test_a_node_that_cannot_be_dialed_is_skipped_and_not_dialed_again_before_its_backoff(tmp_path):
    async def main():
        a, b, dead = await nodes(tmp_path, 3)
        remote = await b.connector()
        dead.server.close()
        await dead.server.wait_closed()
        a.links.update({"g": [dead.node_id]}, {dead.node_id: dead.address, b.node_id: b.address})
        end = user(a)
        end.open()  # on a link still dialing: the OPEN waits in it
        assert end.opening.tunnel.info.node_id == dead.node_id
        await settle(lambda: end.events, "the dial to fail")
        assert end.lost == [True], "a failed dial resets its opens as a dead tunnel does: retryable"
        assert a.metrics.events["peer_link_dials_failed"] == 1 and dead.node_id not in a.links.links
        # within the backoff the dead node is not dialed again, so a stream finds nothing
        with pytest.raises(CannotOpen):
            user(a, label="s-2").open()
        assert a.metrics.events["peer_links_dialed"] == 1
        # B now holds the group: the next stream goes there
        a.links.update({"g": [dead.node_id, b.node_id]}, {dead.node_id: dead.address, b.node_id: b.address})
        other = user(a, label="s-3")
        other.open()
        assert other.opening.tunnel.info.node_id == b.node_id
        await opened(remote)
        await stop(a, b, dead)

    run(main())


def test_an_open_not_yet_accepted_when_the_far_node_goes_is_retried_on_another_node(tmp_path):
    async def main():
        a, b, c = await nodes(tmp_path, 3)
        at_b = await b.connector()
        at_c = await c.connector()
        a.knows(b)
        end = user(a)
        end.open()
        await opened(at_b)  # B's connector has it, and does not answer
        a.knows(b, c)
        b.links.close()  # B goes away (its links with it)
        got = await opened(at_c)
        at_c.session.accept_stream(got.stream_id)
        await at_c.flush()
        await settle(lambda: end.accepted, "OPEN_OK from C")
        assert end.lost == [True] and [t.info.node_id for t in end.opening.tried] == [b.node_id, c.node_id]
        assert a.metrics.apps["web"].opened == 1
        await stop(a, b, c)

    run(main())


def test_the_far_node_going_away_mid_stream_resets_the_users_stream_and_its_connectors(tmp_path):
    async def main():
        a, b, remote, end, got = await forwarded(tmp_path)
        [accepted_link] = b.links.accepted
        accepted_link.transport.abort()  # B's end of the link is gone
        await settle(lambda: end.lost, "the user's stream to hear it")
        assert end.lost == [False], "an accepted stream is committed: it is cut, not retried"
        assert end.events[-1][0] == "reset"
        await remote.until(lambda seen: remote.of(mux.StreamReset), "the connector's stream to be reset")
        await settle(lambda: b.metrics.apps["web"].live == set(), "B to count the stream out")
        assert sum(b.metrics.apps["web"].failed.values()) == 1
        # A dials again for the next stream once the backoff has passed
        await settle(lambda: b.node_id not in a.links.links, "A to drop the dead link")
        await asyncio.sleep(PeeringLimits().redial_initial)
        again = user(a, label="s-2")
        again.open()
        await opened(remote, 2)
        await stop(a, b)

    run(main())


def test_the_bridge_credits_a_peer_only_for_bytes_the_connector_side_took(tmp_path):
    """A connector that reads nothing: B holds at most its write mark plus one stream window of
    the user's bytes, A's session holds the rest, and every byte arrives once it reads again."""

    async def main():
        flow = FlowControl(stream_window=256 * 1024, write_high=64 * 1024, write_low=16 * 1024, tunnel_window=4 << 20)
        a, b, remote, end, got = await forwarded(tmp_path, flow=flow)
        link = end.opening.tunnel
        total = 3 << 20
        chunk = bytes(range(256)) * 256  # 64 KiB
        for _ in range(total // len(chunk)):
            link.send(end.stream_id, chunk)
        [local] = [t for t, _ in b.connectors]
        [bridge_side] = list(local.endpoints.values())
        loop = asyncio.get_running_loop()
        received = bytearray()

        async def pump(credit: bool, until: float) -> None:
            """The connector reads its socket until nothing comes for a while (or all came)."""
            deadline = loop.time() + until
            while len(received) < total and loop.time() < deadline:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(remote.sock, 1 << 20), 0.3)
                except asyncio.TimeoutError:
                    if not credit:
                        return
                    continue
                remote.session.receive_data(data)
                while (event := remote.session.next_event()) is not None:
                    if isinstance(event, mux.DataReceived):
                        received.extend(event.data)
                        if credit:
                            remote.session.consumed(got.stream_id, len(event.data))
                await remote.flush()

        # the connector reads its socket but credits nothing: its window (256 KiB) runs out
        await pump(credit=False, until=3)
        queued_at_b = local.session.send_buffered(bridge_side.stream_id)
        assert len(received) <= flow.stream_window
        assert queued_at_b <= flow.write_high + flow.stream_window + len(chunk), queued_at_b
        assert link.session.send_buffered(end.stream_id) >= total - len(received) - queued_at_b - 2 * flow.stream_window
        assert bridge_side.other.owed > 0, "the peer side holds back the credit of what B could not pass on"
        # the connector reads again: every byte arrives, in order
        remote.session.consumed(got.stream_id, len(received))
        await remote.flush()
        await pump(credit=True, until=20)
        assert len(received) == total and received == chunk * (total // len(chunk))
        await stop(a, b)

    run(main())


def test_a_udp_flows_datagrams_cross_the_link_both_ways(tmp_path):
    async def main():
        a, b, remote, end, got = await forwarded(tmp_path, app=FLOW_APP)
        assert got.meta["proto"] == "udp"
        link = end.opening.tunnel
        assert link.datagram(end.stream_id, b"query")
        await remote.until(lambda seen: remote.of(mux.DatagramReceived), "the datagram at the connector")
        [up] = remote.of(mux.DatagramReceived)
        assert up.flow_id == got.stream_id and up.data == b"query"
        remote.session.send_datagram(got.stream_id, b"answer")
        await remote.flush()
        await settle(lambda: a.user_datagrams, "the answer at A")
        assert a.user_datagrams == [(end.stream_id, b"answer")]
        # the connector's tunnel dies: A hears GOING_AWAY, so its flow moves to another connector
        remote.sock.close()
        await settle(lambda: end.lost, "the flow's reset")
        assert ("reset", ErrorCode.GOING_AWAY) in end.events
        await stop(a, b)

    run(main())


def test_accepted_links_are_bounded_and_refused_beyond(tmp_path):
    async def main():
        a, b, other = await nodes(tmp_path, 3)
        b.links.limits = PeeringLimits(max_accepted=1)
        await b.connector()
        a.knows(b)
        user(a).open()
        await settle(lambda: len(b.links.accepted) == 1, "A's link at B")
        other.knows(b)
        end = user(other)
        end.open()
        await settle(lambda: end.events, "the second link to be refused")
        assert end.lost == [True] and len(b.links.accepted) == 1
        assert b.metrics.events["peer_links_refused"] == 1
        await stop(a, b, other)

    run(main())


def test_the_directory_leaves_out_this_node_unknown_addresses_and_nodes_beyond_its_limit():
    me, *others = [pki.new_node_id() for _ in range(5)]
    directory = PeerDirectory(me, max_nodes=2)
    directory.update(
        {"g": [me, *others], "h": [others[3]]},
        {me: "127.0.0.1:1", others[0]: "127.0.0.1:2", others[1]: "127.0.0.1:3", others[2]: "127.0.0.1:4"},
    )
    assert directory.peers_for("g") == [(others[0], "127.0.0.1:2"), (others[1], "127.0.0.1:3")]
    assert directory.peers_for("h") == [] and directory.peers_for("nope") == []
    assert directory.nodes() == {others[0], others[1]}


def test_streams_a_peer_forwarded_are_never_forwarded_again(tmp_path):
    async def main():
        a, b, c = await nodes(tmp_path, 3)
        await c.connector()
        a.knows(b)
        b.knows(c)  # B has no tunnel of its own, C has: B must not pass A's stream on
        end = user(a)
        end.open()
        await settle(lambda: end.events, "B's refusal")
        assert end.events == [("rejected", ErrorCode.REFUSED_STREAM)]
        assert b.links.links == {} and "peer_links_dialed" not in b.metrics.events
        await stop(a, b, c)

    run(main())


def test_a_link_to_an_address_answered_by_another_node_sends_nothing_and_is_dropped(tmp_path):
    async def main():
        a, b, c = await nodes(tmp_path, 3)
        at_b = await b.connector()
        # the directory says C is at B's address (a stale entry, a reused address)
        a.links.update({"g": [c.node_id]}, {c.node_id: b.address})
        end = user(a)
        end.open()
        await settle(lambda: end.lost, "the link to be dropped")
        assert end.lost == [True] and c.node_id not in a.links.links
        assert b.metrics.events.get("peer_streams_bridged", 0) == 0
        assert not at_b.of(mux.StreamOpened)
        await stop(a, b, c)

    run(main())


def test_a_draining_node_takes_no_new_streams_and_its_streams_in_flight_go_on(tmp_path):
    async def main():
        a, b, remote, end, got = await forwarded(tmp_path)
        link = end.opening.tunnel
        b.links.drain()  # B is stopping: GOAWAY on its links
        await settle(lambda: not link.usable, "A to hear B's GOAWAY")
        with pytest.raises(CannotOpen):
            user(a, label="s-2").open()  # not on the draining link, and no second link to B
        assert a.metrics.events["peer_links_dialed"] == 1
        link.send(end.stream_id, b"still here")
        await remote.until(
            lambda seen: b"".join(e.data for e in remote.of(mux.DataReceived)) == b"still here", "the bytes"
        )
        remote.session.send_data(got.stream_id, b"and back", end=True)
        await remote.flush()
        await settle(lambda: end.received == b"and back" and end.ended, "the answer")
        await stop(a, b)

    run(main())


def test_a_link_let_go_is_drained_then_closed_and_the_node_dialed_anew_when_it_is_back(tmp_path):
    async def main():
        a, b, remote, end, got = await forwarded(tmp_path)
        link = end.opening.tunnel
        a.links.update({}, {})  # B is no longer listed: its link drains, the stream goes on
        assert link.session.draining and not link.closed and a.links.links == {b.node_id: link}
        remote.session.send_data(got.stream_id, b"done", end=True)
        await remote.flush()
        await settle(lambda: end.ended, "the answer")
        link.end(end.stream_id)
        await settle(lambda: link.load == 0, "the stream to end")
        a.knows(b)  # B is back: the drained link is closed, and the next stream dials again
        await settle(lambda: link.closed and b.node_id not in a.links.links, "the drained link to close")
        await asyncio.sleep(PeeringLimits().redial_initial)
        again = user(a, label="s-2")
        again.open()
        assert again.opening.tunnel is not link and a.metrics.events["peer_links_dialed"] == 2
        await opened(remote, 2)
        await stop(a, b)

    run(main())
