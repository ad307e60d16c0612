"""relay/opening.py: how every edge opens a tunnel stream, against the real TunnelRegistry.

Tunnels are real Tunnel objects over real mux Sessions. Where the connector's answer
matters (OPEN_OK, OPEN_FAIL, a tunnel dying), the tunnel sits on one end of a
socketpair and the far end is a bare mux Session the test drives by hand
(test_udp_flows.FarEnd); elsewhere the tunnels are not connected, since opening only
reads their connector, usability and load. Endpoints are small recording classes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from backhaul.config import FlowControl, Keepalive
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.opening import OPEN_ATTEMPTS, CannotOpen, Opening, StreamOpener
from backhaul.relay.routing import TunnelRecord, TunnelRegistry
from backhaul.store.base import App
from backhaul.transport.tunnel import Tunnel

from .test_udp_flows import tunnel_pair

APP = App(name="web", group="g", proto="tcp", port=1, target="10.0.0.1:80")


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 30))


class Figures:
    """What the metrics read of one user stream (relay.opening.StreamFigures)."""

    def __init__(self, app: str = "web") -> None:
        self.labels = {"app": app}
        self.started = time.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0
        self.code = ErrorCode.NO_ERROR


class Recorder:
    """A StreamEndpoint that notes what the tunnel told it."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_accepted(self) -> None:
        self.events.append(("accepted",))

    def on_rejected(self, code: int, reason: str) -> None:
        self.events.append(("rejected", code))

    def on_data(self, data: bytes, end: bool) -> None:
        self.events.append(("data", data, end))

    def on_end(self) -> None:
        self.events.append(("end",))

    def on_reset(self, code: int, reason: str) -> None:
        self.events.append(("reset", code))

    def on_write_resumed(self) -> None:
        pass


class Owner:
    """The TunnelOwner of tunnels that never connect: only a close reaches it, and changes nothing."""

    def tunnel_down(self, tunnel, code, reason):
        pass


def _tunnel(registry: TunnelRegistry, connector_id: str, group: str = "g", flow: FlowControl = FlowControl()) -> Tunnel:
    tunnel = Tunnel(mux.Session(mux.Role.RELAY, flow, Keepalive()), Owner(), name=connector_id, flow=flow)
    tunnel.info = TunnelRecord(connector_id, group)
    registry.add(tunnel)
    return tunnel


def _connector(tunnel: Tunnel) -> str:
    return tunnel.info.connector_id


# ---------------------------------------------------------------------------- choosing tunnels


def test_a_retry_goes_to_another_connector_first_and_attempts_are_capped():
    async def main():
        registry = TunnelRegistry()
        a1, a2, b = _tunnel(registry, "a"), _tunnel(registry, "a"), _tunnel(registry, "b")
        opening = StreamOpener(registry).begin(APP, "tcp", "192.0.2.1:5000", "s-1")
        first = opening.open(Recorder())
        assert first > 0 and opening.tunnel.load == 1
        tried = [_connector(opening.tunnel)]
        opening.open(Recorder())  # as an edge does after a retryable refusal
        tried.append(_connector(opening.tunnel))
        assert sorted(tried) == ["a", "b"], "the retry went to the connector not tried yet"
        opening.open(Recorder())
        assert opening.tried[2] in (a1, a2) and opening.tried[2] not in opening.tried[:2], "then a's other tunnel"
        assert len(opening.tried) == OPEN_ATTEMPTS == 3
        with pytest.raises(CannotOpen) as refused:
            opening.open(Recorder())
        assert refused.value.attempted == 3 and not refused.value.unreachable
        assert "no connector of group 'g' could take the stream" in str(refused.value)
        assert opening.tunnel is None
        assert sorted(t.load for t in (a1, a2, b)) == [1, 1, 1], "three opens, no fourth"

    run(main())


def test_the_attempt_count_is_the_openers():
    async def main():
        registry = TunnelRegistry()
        for cid in "abc":
            _tunnel(registry, cid)
        opening = StreamOpener(registry, attempts=2).begin(APP, "tcp", "c", "s-1")
        opening.open(Recorder())
        opening.open(Recorder())
        with pytest.raises(CannotOpen) as refused:
            opening.open(Recorder())
        assert refused.value.attempted == 2
        assert len({_connector(t) for t in opening.tried}) == 2
        assert sum(t.load for t in registry.tunnels()) == 2

    run(main())


def test_no_route_becomes_cannot_open_with_routings_reason():
    async def main():
        registry = TunnelRegistry()
        opener = StreamOpener(registry)
        with pytest.raises(CannotOpen) as none:
            opener.begin(APP, "tcp", "c", "s-1").open(Recorder())
        assert str(none.value) == "no active connector in group 'g'"
        assert none.value.attempted == 0 and not none.value.unreachable

        a = _tunnel(registry, "a")
        b = _tunnel(registry, "b")
        registry.report_health(a, {"web": False})
        registry.report_health(b, {"web": False})
        with pytest.raises(CannotOpen) as down:
            opener.begin(APP, "tcp", "c", "s-2").open(Recorder())
        assert down.value.unreachable and down.value.attempted == 0
        assert "no connector in group 'g' can reach app 'web'" in str(down.value)
        assert a.load == b.load == 0

        # a reaches the app again: the first open lands there, the retry finds only b, which cannot
        registry.report_health(a, {"web": True})
        opening = opener.begin(APP, "tcp", "c", "s-3")
        opening.open(Recorder())
        assert opening.tunnel is a
        with pytest.raises(CannotOpen) as after:
            opening.open(Recorder())
        assert after.value.unreachable and after.value.attempted == 1

        # b is gone: after one try there is no route at all, and the user is told to try again
        registry.remove(b)
        opening = opener.begin(APP, "tcp", "c", "s-4")
        opening.open(Recorder())
        with pytest.raises(CannotOpen) as gone:
            opening.open(Recorder())
        assert not gone.value.unreachable and gone.value.attempted == 1
        assert "could take the stream; try again" in str(gone.value)

    run(main())


def test_a_tunnel_that_cannot_open_is_skipped_for_the_next():
    async def main():
        registry = TunnelRegistry()
        full = _tunnel(registry, "a", flow=FlowControl(max_streams=1))
        busy = _tunnel(registry, "b")
        full.open({"app": "web", "target": "x", "proto": "tcp", "client": "c", "id": "0"}, Recorder())
        for n in range(2):  # b is busier, so a's full tunnel is the least-loaded pick
            busy.open({"app": "web", "target": "x", "proto": "tcp", "client": "c", "id": str(n)}, Recorder())
        with pytest.raises(mux.SessionError):
            full.open({"app": "web", "target": "x", "proto": "tcp", "client": "c", "id": "9"}, Recorder())
        opening = StreamOpener(registry).begin(APP, "tcp", "c", "s-1")
        opening.open(Recorder())
        assert opening.tried == [full, busy] and opening.tunnel is busy and busy.load == 3

        # a closed tunnel is not offered at all
        busy.close(ErrorCode.NO_ERROR, "test")
        with pytest.raises(CannotOpen) as refused:
            StreamOpener(registry).begin(APP, "tcp", "c", "s-2").open(Recorder())
        assert refused.value.attempted == 1 and full.load == 1

    run(main())


def test_restart_starts_the_tries_over_without_the_excluded_tunnels():
    async def main():
        registry = TunnelRegistry()
        a, b = _tunnel(registry, "a"), _tunnel(registry, "b")
        opening = StreamOpener(registry).begin(APP, "udp", "c", "f-1")
        opening.open(Recorder())
        opening.open(Recorder())
        assert len(opening.tried) == 2
        dead = opening.tunnel
        opening.restart([dead])
        assert opening.tried == [dead] and opening.tunnel is None
        opening.open(Recorder())
        assert opening.tunnel is (b if dead is a else a)
        opening.restart()
        assert opening.tried == [] and opening.tunnel is None

    run(main())


def test_two_connectors_split_streams_evenly_whatever_their_tunnel_counts():
    """Balance is per connector: a connector with three tunnels in this worker gets no more
    streams than one with one (before, each tunnel drew its share: 3 to 1)."""

    async def main():
        registry = TunnelRegistry()
        many = [_tunnel(registry, "many") for _ in range(3)]
        one = _tunnel(registry, "one")
        opener = StreamOpener(registry)
        picked = Counter()
        for n in range(40):
            opening = opener.begin(APP, "tcp", "c", f"s-{n}")
            opening.open(Recorder())
            picked[_connector(opening.tunnel)] += 1
        assert picked == {"many": 20, "one": 20}
        assert one.load == 20 and sorted(t.load for t in many) == [6, 7, 7], "and per tunnel within a connector"

    run(main())


# ---------------------------------------------------------------------------- the connector's answers


class RetryingEndpoint(Recorder):
    """An edge's stream reduced to the opener's rules: retry what is retryable, count the rest."""

    def __init__(self, opening: Opening) -> None:
        super().__init__()
        self.opening = opening
        self.accepted = False
        self.lost: list[bool] = []

    def on_accepted(self) -> None:
        super().on_accepted()
        self.accepted = True
        self.opening.accepted()

    def on_rejected(self, code: int, reason: str) -> None:
        super().on_rejected(code, reason)
        if self.opening.retryable(code):
            try:
                self.opening.open(self)
                return
            except CannotOpen:
                pass
        self.opening.done(code)

    def on_reset(self, code: int, reason: str) -> None:
        super().on_reset(code, reason)
        lost = self.opening.lost_with_tunnel(self.accepted)
        self.lost.append(lost)
        if lost:
            self.on_rejected(ErrorCode.PEER_DEAD, reason)
        else:
            self.opening.done(code)


class Relay:
    """The TunnelOwner of the relay's end: files tunnels in the registry as the worker does."""

    def __init__(self, registry: TunnelRegistry) -> None:
        self.registry = registry
        self.count = 0

    def tunnel_up(self, tunnel):
        self.count += 1
        tunnel.info = TunnelRecord(f"c-{self.count}", "g")
        self.registry.add(tunnel)

    def tunnel_down(self, tunnel, code, reason):
        self.registry.remove(tunnel)

    def stream_opened(self, tunnel, stream_id, meta):
        tunnel.reject(stream_id, ErrorCode.PROTOCOL_ERROR, "no")

    def control_received(self, tunnel, message):
        pass

    def goaway_received(self, tunnel, code, reason):
        pass

    def datagram_received(self, tunnel, flow_id, data):
        pass


async def _two_connectors():
    registry = TunnelRegistry()
    relay = Relay(registry)
    pairs = [await tunnel_pair(relay, mux.Role.RELAY) for _ in range(2)]
    far_of = {tunnel: far for tunnel, far in pairs}
    return registry, far_of


def test_a_refusal_is_retried_on_the_other_connector_and_the_stream_counted_once():
    async def main():
        registry, far_of = await _two_connectors()
        metrics = RelayMetrics()
        figures = Figures()
        opening = StreamOpener(registry, metrics).begin(APP, "tcp", "192.0.2.1:5000", "s-1", figures=figures)
        endpoint = RetryingEndpoint(opening)
        opening.open(endpoint)
        first = opening.tunnel
        far = far_of[first]
        await far.until(lambda seen: far.of(mux.StreamOpened), "the OPEN")
        [opened] = far.of(mux.StreamOpened)
        assert opened.meta["app"] == "web" and opened.meta["proto"] == "tcp" and opened.meta["id"] == "s-1"
        far.session.reject_stream(opened.stream_id, ErrorCode.REFUSED_STREAM, "full")
        await far.flush()
        for _ in range(500):
            if opening.tunnel is not first:
                break
            await asyncio.sleep(0.01)
        second = opening.tunnel
        assert second is not None and second is not first and _connector(second) != _connector(first)
        other = far_of[second]
        await other.until(lambda seen: other.of(mux.StreamOpened), "the retried OPEN")
        [reopened] = other.of(mux.StreamOpened)
        other.session.accept_stream(reopened.stream_id)
        await other.flush()
        for _ in range(500):
            if endpoint.accepted:
                break
            await asyncio.sleep(0.01)
        assert endpoint.events == [("rejected", ErrorCode.REFUSED_STREAM), ("accepted",)]
        app = metrics.apps["web"]
        assert app.opened == 1 and app.live == {figures}
        assert sum(app.latency.counts) == 1
        # late or repeated hooks count nothing more
        opening.started()
        opening.accepted()
        figures.bytes_up, figures.bytes_down = 10, 20
        opening.done(ErrorCode.CANCEL)
        opening.done(ErrorCode.INTERNAL_ERROR)
        assert app.opened == 1 and app.live == set() and sum(app.latency.counts) == 1
        assert app.to_app == 10 and app.to_client == 20 and app.failed == {"CANCEL": 1}
        for tunnel in far_of:
            tunnel.close()

    run(main())


async def _settle(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_reset_is_lost_with_the_tunnel_only_before_open_ok_on_a_dead_tunnel():
    async def main():
        registry = TunnelRegistry()
        relay = Relay(registry)
        metrics = RelayMetrics()
        opener = StreamOpener(registry, metrics)
        dying, far = await tunnel_pair(relay, mux.Role.RELAY)

        # an RST on a live tunnel before OPEN_OK is the connector's answer, not a lost tunnel
        refused = opener.begin(APP, "tcp", "c", "s-1", figures=Figures())
        refused_end = RetryingEndpoint(refused)
        refused.open(refused_end)
        await far.until(lambda seen: far.of(mux.StreamOpened), "the OPEN")
        far.session.reset_stream(far.of(mux.StreamOpened)[0].stream_id, ErrorCode.CANCEL, "no")
        await far.flush()
        await _settle(lambda: refused_end.lost, "the RST")
        assert refused_end.lost == [False] and metrics.apps["web"].failed == {"CANCEL": 1}

        # one stream accepted and one still opening on the tunnel; a second connector comes; the first dies
        held = opener.begin(APP, "tcp", "c", "s-2", figures=Figures())
        held_end = RetryingEndpoint(held)
        held.open(held_end)
        pending = opener.begin(APP, "tcp", "c", "s-3", figures=Figures())
        pending_end = RetryingEndpoint(pending)
        pending.open(pending_end)
        assert held.tunnel is dying and pending.tunnel is dying
        await far.until(lambda seen: len(far.of(mux.StreamOpened)) == 3, "two more OPENs")
        far.session.accept_stream(far.of(mux.StreamOpened)[1].stream_id)
        await far.flush()
        await _settle(lambda: held_end.accepted, "OPEN_OK")
        survivor, other = await tunnel_pair(relay, mux.Role.RELAY)
        await _settle(lambda: len(registry.tunnels()) == 2, "the second connector's tunnel")
        far.sock.close()  # the first connector vanishes
        await _settle(lambda: held_end.lost and pending_end.lost, "both streams to hear of it")
        assert held_end.lost == [False], "an accepted stream is committed: it is cut, not retried"
        assert pending_end.lost == [True], "an unanswered open is a refusal: offered to the next connector"
        assert pending.tunnel is survivor and pending.tried == [dying, survivor]
        await other.until(lambda seen: other.of(mux.StreamOpened), "the retried OPEN")
        [reopened] = other.of(mux.StreamOpened)
        assert reopened.meta["id"] == "s-3"
        app = metrics.apps["web"]
        assert app.opened == 3 and app.live == {pending.figures}, "the cut stream counted out, the retried one still in"
        survivor.close()

    run(main())


# ---------------------------------------------------------------------------- waiting for a route


class NoPeers:
    """PeerRoutes of a worker whose store lists other nodes, none holding the group (yet)."""

    clustered = True

    def pick(self, group, exclude):
        return None


def test_with_other_nodes_a_stream_without_a_route_waits_for_one_then_is_refused():
    async def main():
        now = [100.0]
        registry = TunnelRegistry()
        opener = StreamOpener(registry, peers=NoPeers(), clock=lambda: now[0])
        opening = opener.begin(APP, "tcp", "c", "s-1")
        with pytest.raises(CannotOpen) as waiting:
            opening.open(Recorder())
        assert waiting.value.retry_after == pytest.approx(0.1), "no route yet: try again shortly"
        now[0] += 2.0
        a = _tunnel(registry, "a")  # the connector re-homed here meanwhile
        assert opening.open(Recorder()) > 0 and opening.tunnel is a

        late = opener.begin(APP, "tcp", "c", "s-2")
        registry.remove(a)
        now[0] += 2.95
        with pytest.raises(CannotOpen) as last:
            late.open(Recorder())
        assert last.value.retry_after == pytest.approx(0.05), "never past route_wait"
        now[0] += 0.05
        with pytest.raises(CannotOpen) as refused:
            late.open(Recorder())
        assert refused.value.retry_after == 0 and str(refused.value) == "no active connector in group 'g'"

    run(main())


def test_a_live_connectors_refusal_or_a_single_node_never_waits():
    async def main():
        registry = TunnelRegistry()
        single = NoPeers()
        single.clustered = False
        with pytest.raises(CannotOpen) as alone:
            StreamOpener(registry, peers=single).begin(APP, "tcp", "c", "s-1").open(Recorder())
        assert alone.value.retry_after == 0, "one node: no route can turn up elsewhere"

        _tunnel(registry, "a")
        opening = StreamOpener(registry, peers=NoPeers()).begin(APP, "tcp", "c", "s-2")
        opening.open(Recorder())  # a takes it, then refuses it (as an edge learns from OPEN_FAIL)
        with pytest.raises(CannotOpen) as refused:
            opening.open(Recorder())
        assert refused.value.retry_after == 0 and refused.value.attempted == 1, "a live tunnel said no"

        forwarded = StreamOpener(registry, peers=NoPeers()).begin(APP, "tcp", "c", "s-3", forward=False)
        forwarded.open(Recorder())
        with pytest.raises(CannotOpen) as once:
            forwarded.open(Recorder())
        assert once.value.retry_after == 0, "a stream a peer forwarded here never waits: the peer does"

    run(main())
