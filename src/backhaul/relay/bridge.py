"""The far end of a forwarded stream: a stream a peer node opened on a relay-to-relay link,
spliced to a stream of this node's own connector tunnel.

Theory of operation. Node A carries a user whose app's connectors hold tunnels only on
node B: A opens the stream on its link to B (relay.peering) with the very OPEN metadata it
would send a connector. B (this module) looks the app up by name among its own apps, and
opens it on a *local* tunnel only, through the worker's StreamOpener with forwarding off (a
forwarded stream is never forwarded again, so streams cannot loop), with the same retries
and metrics as a user stream of its own. Only when a connector answers OPEN_OK does B
accept the peer's stream; a connector's refusal goes back to A as OPEN_FAIL with the
connector's code, so A's retry logic (relay.opening) treats it as it would a refusal on
one of its own tunnels. Until then nothing is committed: A holds the user's bytes, and
DATA a peer sends early waits in the link (Tunnel's early buffer, within the initial window).

Once accepted, a :class:`Bridge` is two :class:`Side` endpoints, one on each tunnel: DATA
from one side is sent on the other, and the bytes are credited back (``Tunnel.consumed``)
on the first side only once the second took them (``send`` returned True, else at its
``on_write_resumed``), so a slow reader at either end holds the far sender at one stream
window and nothing here grows. FIN and RST are passed across, DATAGRAMs of a UDP flow too
(``Side.deliver``). Per DATA frame that is one send, one compare and one credit: O(1).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Callable

from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.protocol.mux import SessionError
from backhaul.relay.opening import CannotOpen, Opening, StreamOpener

if TYPE_CHECKING:
    from backhaul.relay.metrics import RelayMetrics
    from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay.bridge")

#: The OPEN metadata keys every stream has (mux.stream_meta), and the names StreamOpener.begin
#: takes itself; the other keys (the signed-in user of an HTTP app, ...) are passed on to the
#: connector as they came.
_BASE_KEYS = ("app", "target", "proto", "client", "id", "stream_label", "figures", "forward")
#: How a connector serves a stream; anything else is refused before a connector sees it.
_PROTOS = ("tcp", "udp", "http")


class Side:
    """One tunnel stream of a bridge: the endpoint its tunnel reports to."""

    __slots__ = ("bridge", "tunnel", "stream_id", "other", "owed", "ended")

    def __init__(self, bridge: "Bridge") -> None:
        self.bridge = bridge
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.other: Side | None = None
        #: bytes received on this side, sent on the other and not yet credited back here
        self.owed = 0
        #: the far end of this side ended its half (FIN or END)
        self.ended = False

    # ------------------------------------------------------------------ StreamEndpoint

    def on_data(self, data, end: bool) -> None:
        size = len(data)
        other = self.other
        bridge = self.bridge
        if self is bridge.peer:
            bridge.bytes_up += size
        else:
            bridge.bytes_down += size
        try:
            took = other.tunnel.send(other.stream_id, data, end)
        except SessionError as exc:
            self.tunnel.consumed(self.stream_id, size)
            bridge.broken(self, f"the other stream is gone: {exc}")
            return
        if took:
            self.tunnel.consumed(self.stream_id, size)
        else:
            self.owed += size
        if end:
            self.ended = True
            bridge.maybe_done()

    def on_end(self) -> None:
        self.ended = True
        other = self.other
        other.tunnel.end(other.stream_id)
        self.bridge.maybe_done()

    def on_write_resumed(self) -> None:
        """This side's stream takes bytes again: credit the other side for what it sent here."""
        other = self.other
        if other is not None and other.owed:
            owed, other.owed = other.owed, 0
            other.tunnel.consumed(other.stream_id, owed)

    def on_reset(self, code: int, reason: str) -> None:
        bridge = self.bridge
        if self is bridge.local and not bridge.accepted:
            bridge.local_reset(code, reason)
            return
        bridge.reset_from(self, code, reason)

    def on_accepted(self) -> None:
        self.bridge.local_accepted()

    def on_rejected(self, code: int, reason: str) -> None:
        self.bridge.local_rejected(code, reason)

    # ------------------------------------------------------------------ datagrams

    def deliver(self, data: bytes) -> None:
        """A DATAGRAM that arrived on this side: sent on the other (a UDP flow), or dropped and counted."""
        bridge = self.bridge
        other = self.other
        if bridge.accepted and bridge.proto == "udp" and other.tunnel.datagram(other.stream_id, data):
            if self is bridge.peer:
                bridge.bytes_up += len(data)
            else:
                bridge.bytes_down += len(data)
            return
        bridge.metrics_count("peer_datagrams_dropped")


class Bridge:
    """One forwarded stream on this node: the peer link's stream and the local tunnel's.

    It is also the stream's figures in this node's metrics (relay.opening.StreamFigures).
    """

    __slots__ = (
        "link", "opening", "proto", "peer", "local", "accepted", "finished",
        "labels", "started", "bytes_up", "bytes_down", "code", "_count",
    )

    def __init__(self, link: "Tunnel", stream_id: int, app, meta: dict, count: Callable[[str], None]) -> None:
        self.link = link
        self.opening: Opening | None = None
        self.proto = meta["proto"]
        self.peer = Side(self)  # the stream the peer node opened on the link
        self.peer.tunnel = link
        self.peer.stream_id = stream_id
        self.local = Side(self)  # the stream this node opens on its connector's tunnel
        self.peer.other, self.local.other = self.local, self.peer
        self.accepted = False
        self.finished = False
        self.labels = {
            "app": app.name,
            "target": app.target,
            "client": str(meta.get("client", "?")),
            "id": str(meta.get("id", "")) or secrets.token_hex(8),
            "via": link.peer_id,
        }
        self.started = time.monotonic()
        self.bytes_up = 0  # from the peer (the user) to the connector
        self.bytes_down = 0
        self.code = ErrorCode.NO_ERROR
        self._count = count

    def metrics_count(self, event: str) -> None:
        self._count(event)

    # ------------------------------------------------------------------ opening

    def open(self) -> bool:
        """Open the local stream (the next local tunnel); False when none took it (the peer was answered)."""
        try:
            self.local.stream_id = self.opening.open(self.local)
        except CannotOpen as exc:
            self.refuse(ErrorCode.REFUSED_STREAM, f"this node cannot reach a connector of the app: {exc}")
            return False
        self.local.tunnel = self.opening.tunnel
        return True

    def local_accepted(self) -> None:
        """A connector took the stream: take the peer's, and bytes flow (DATA it sent early first)."""
        self.accepted = True
        self.opening.accepted()
        try:
            self.link.accept(self.peer.stream_id, self.peer)
        except SessionError as exc:
            # The peer reset its stream (the user went away) or its link died while we opened.
            self.link.endpoints.pop(self.peer.stream_id, None)  # Tunnel.accept filed it first
            self._reset(self.local, ErrorCode.CANCEL, "the peer node's stream is gone")
            self._finish(ErrorCode.CANCEL, f"the peer node's stream is gone: {exc}")

    def local_rejected(self, code: int, reason: str) -> None:
        """A connector refused: the next local tunnel when the code allows, else the peer hears the code."""
        self.local.tunnel = None
        if Opening.retryable(code) and not self.link.session.closed:
            log.info(
                "forwarded stream refused, retrying on another connector",
                extra={**self.labels, "code": error_name(code), "reason": reason},
            )
            self.open()
            return
        self.refuse(code, reason)

    def local_reset(self, code: int, reason: str) -> None:
        """An RST before OPEN_OK: a refusal (retried when the tunnel died), passed back otherwise."""
        if self.opening.lost_with_tunnel(False):
            self.local_rejected(ErrorCode.PEER_DEAD, reason)
        else:
            self.local.tunnel = None
            self.refuse(code, reason)

    def refuse(self, code: int, reason: str) -> None:
        """Answer the peer OPEN_FAIL with ``code`` (its own retry logic reads it)."""
        try:
            self.link.reject(self.peer.stream_id, code, reason)
        except SessionError:
            pass  # the peer's stream or link is gone already: nobody to answer
        self._finish(code, f"refused: {error_name(code)}: {reason}")

    # ------------------------------------------------------------------ after OPEN_OK

    def maybe_done(self) -> None:
        if self.peer.ended and self.local.ended:
            self._finish(ErrorCode.NO_ERROR, "completed")

    def reset_from(self, side: Side, code: int, reason: str) -> None:
        """``side``'s stream was reset: so is the other, with the same code."""
        other = side.other
        if (
            side is self.local
            and self.proto == "udp"
            and side.tunnel is not None
            and side.tunnel.session.closed
        ):
            # A flow commits nothing: the peer moves it to another connector on GOING_AWAY.
            code = ErrorCode.GOING_AWAY
        self._credit(side)
        self._reset(other, code, reason)
        self._finish(code, f"reset: {error_name(code)}: {reason}")

    def broken(self, side: Side, reason: str) -> None:
        """Sending on ``side``'s other stream failed: it is gone; ``side``'s goes too."""
        self._reset(side, ErrorCode.CANCEL, reason)
        self._finish(ErrorCode.CANCEL, reason)

    def _reset(self, side: Side, code: int, reason: str) -> None:
        self._credit(side)
        tunnel = side.tunnel
        if tunnel is not None and side.stream_id and not tunnel.closed:
            tunnel.reset(side.stream_id, code, reason)

    @staticmethod
    def _credit(side: Side) -> None:
        """Give back what ``side`` still owes its tunnel: the tunnel's window must not shrink."""
        if side.owed and side.tunnel is not None:
            owed, side.owed = side.owed, 0
            side.tunnel.consumed(side.stream_id, owed)

    def _finish(self, code: int, result: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.opening.done(code)
        log.info(
            "forwarded stream ended",
            extra={
                **self.labels,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "seconds": round(time.monotonic() - self.started, 4),
                "result": result,
            },
        )


def serve(
    link: "Tunnel", stream_id: int, meta: dict, apps: dict, opener: StreamOpener, metrics: "RelayMetrics | None"
) -> Bridge | None:
    """A peer node opened ``stream_id`` on ``link``: bridge it to a local connector, or refuse it.

    ``apps`` is this worker's apps by name (the store's, as of its last reload).
    """
    count = metrics.count if metrics is not None else _no_count
    name = meta.get("app")
    app = apps.get(name) if isinstance(name, str) else None
    if app is None:
        link.reject(stream_id, ErrorCode.UNKNOWN_APP, f"this node has no app {name!r}")
        count("peer_streams_refused")
        log.warning("forwarded stream for an unknown app refused", extra={"app": str(name)[:100], "via": link.peer_id})
        return None
    proto = meta.get("proto")
    if proto not in _PROTOS or (proto == "udp") != (app.proto == "udp"):
        link.reject(stream_id, ErrorCode.PROTOCOL_ERROR, f"app {app.name!r} is not served as {str(proto)[:16]!r}")
        count("peer_streams_refused")
        log.warning("forwarded stream of the wrong kind refused", extra={"app": app.name, "proto": str(proto)[:16], "via": link.peer_id})
        return None
    bridge = Bridge(link, stream_id, app, meta, count)
    extra = {key: value for key, value in meta.items() if key not in _BASE_KEYS}
    labels = bridge.labels
    bridge.opening = opener.begin(app, proto, labels["client"], labels["id"], figures=bridge, forward=False, **extra)
    count("peer_streams_bridged")
    bridge.open()
    return bridge


def _no_count(event: str) -> None:
    """Counting nothing (no metrics, as in unit tests)."""
