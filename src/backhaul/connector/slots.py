"""A connector worker's tunnel slots to one address: how many tunnels, to which relay workers.

Every tunnel is dialed out (the connector never listens). A slot dials one tunnel and,
when it closes, dials again forever with exponential backoff and full jitter. The
relay's ``hello`` names the relay worker that holds the tunnel; a slot is added while
some relay worker holds none of this group's tunnels, so that any relay worker can
route to it (``needs_another``). On SIGHUP the count follows the settings; the slots
to retire are the newest whose relay worker keeps another tunnel (``to_retire``), and a
retired slot's tunnel gets GOAWAY and closes once its streams end.

A worker holds one group of slots (``TunnelSlots``) per address it dials: its enrolled
address, or the addresses of the relay nodes it chose (connector.homes decides which;
connector.nodes holds those decisions). ``group_view`` tells the decisions whether a
group is ready (covers every relay worker of its node) or lost (its node sent GOAWAY or
its dials keep failing); ``leave`` retires a whole group.

Each tunnel carries a ``TunnelRecord`` in ``tunnel.info`` from the moment it is made:
its slot, whether the relay said hello and from which worker and node, whether it is
retiring or rotating, whether the relay sent GOAWAY, a future done when it is down and one
done when its slot may dial its successor (down, or rotated: transport/rotation.py). The
decisions (``to_retire``, ``needs_another``, ``group_view``) are plain functions of
those records.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import ssl
import time
from typing import Callable, Iterable, Iterator, Mapping

from backhaul.config import Backoff
from backhaul.connector import nodes
from backhaul.connector.settings import ConnectorSettings
from backhaul.errors import ProxyError
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from backhaul.transport import fasttls, proxy_connect
from backhaul.transport.rotation import ROTATION_REASON
from backhaul.transport.tunnel import Tunnel, TunnelOwner

log = logging.getLogger("backhaul.connector")


def backoff_delay(backoff: Backoff, attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (from 0): full jitter under an exponential cap."""
    return random.uniform(0, min(backoff.maximum, backoff.initial * backoff.factor**attempt))


class TunnelRecord:
    """What the connector keeps about one of its tunnels (``tunnel.info``)."""

    __slots__ = ("slot", "home", "hello", "relay_worker", "node", "retiring", "rotating", "relay_goaway", "closed", "released")

    def __init__(
        self, slot: int, closed: asyncio.Future, home: "TunnelSlots | None" = None, released: asyncio.Future | None = None
    ) -> None:
        #: the slot that dialed it, and the group of slots it belongs to
        self.slot = slot
        self.home = home
        #: the relay answered hello on it (until then it carries no stream)
        self.hello = False
        #: the relay worker holding it, as its hello named it
        self.relay_worker: object = None
        #: the relay node holding it, as its hello named it (None: a one-node service)
        self.node: str | None = None
        #: GOAWAY sent because the worker needs fewer tunnels; it no longer covers its relay worker
        self.retiring = False
        #: GOAWAY "key rotation" sent or received: it drains while its slot dials a successor
        self.rotating = False
        #: the relay sent GOAWAY on it (a draining node): it may carry streams still, but
        #: its node is on its way out
        self.relay_goaway = False
        #: done once the tunnel is down
        self.closed = closed
        #: done once its slot may dial again: the tunnel is down or rotating (None: at ``closed``)
        self.released = released

    @property
    def serving(self) -> bool:
        """Up and not on its way out: it covers its relay worker."""
        return self.hello and not self.retiring and not self.rotating


def to_retire(live: Iterable[int], want: int, records: Mapping[int, TunnelRecord]) -> list[int]:
    """The slots to retire so that ``want`` of the ``live`` ones remain, newest first.

    ``records`` holds the tunnel record of each slot whose tunnel is connected. A slot
    whose tunnel is the last serving one of its relay worker is kept (so fewer than asked
    may be retired); one still connecting, or not answered yet, goes freely."""
    live = sorted(live, reverse=True)
    extra = len(live) - want
    serving = collections.Counter(r.relay_worker for r in records.values() if r.serving)
    chosen: list[int] = []
    for index in live:
        if extra <= 0:
            break
        record = records.get(index)
        if record is not None and record.hello:
            if serving[record.relay_worker] <= 1:
                continue
            serving[record.relay_worker] -= 1
        extra -= 1
        chosen.append(index)
    return chosen


def needs_another(records: Iterable[TunnelRecord], live_slots: int, relay_workers: int) -> bool:
    """Whether to dial one more tunnel: some relay worker holds none of the serving ones,
    and no slot is still connecting (whose tunnel may yet land there)."""
    serving = [r for r in records if r.serving]
    covered = {r.relay_worker for r in serving}
    connecting = live_slots - len(serving)
    return len(covered) < relay_workers and connecting <= 0


def group_view(
    records: Iterable[TunnelRecord], relay_workers: int, failures: int, goaway: bool, failed_dials: int
) -> nodes.GroupView:
    """What the node decisions need of one group: its serving tunnels (GOAWAY from the relay
    excluded), whether they cover every relay worker, whether its node is lost (nothing
    serving, and a GOAWAY or ``failed_dials`` failed dials in a row since its last hello)."""
    serving = [r for r in records if r.serving and not r.relay_goaway]
    covered = {r.relay_worker for r in serving}
    return nodes.GroupView(
        serving=len(serving),
        ready=bool(serving) and len(covered) >= relay_workers,
        lost=not serving and (goaway or failures >= failed_dials),
        reached=frozenset(r.node for r in serving if r.node is not None),
    )


class TunnelSlots:
    """The tunnel slots of one connector worker to one address (see the module docstring).

    ``settings`` is called for the current settings (SIGHUP replaces them); ``owner`` gets
    the tunnels' events; ``stopping`` is set when the worker stops, and ``close`` ends
    every slot. ``ssl_context`` gives the context new tunnels use (renewal replaces it);
    ``numbers`` hands out slot numbers unique in the worker (the tunnels' names);
    ``room`` says whether the worker may add a slot (its ``max_slots`` over every group);
    ``changed`` is called when the group's view may have changed."""

    def __init__(
        self,
        settings: Callable[[], ConnectorSettings],
        connector_id: str,
        target: nodes.Target,
        owner: TunnelOwner,
        stopping: asyncio.Event,
        ssl_context: Callable[[], ssl.SSLContext | None],
        numbers: Iterator[int],
        room: Callable[[], bool],
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._owner = owner
        self._stopping = stopping
        self._closing = False
        self.target = target
        self.host, self.port = target.host, target.port
        self._connector_id = connector_id
        self._ssl = ssl_context
        self._numbers = numbers
        self._room = room
        self._changed = changed
        #: tunnels connected now (between the owner's tunnel_up and tunnel_down)
        self.tunnels: set[Tunnel] = set()
        #: how many workers the relay has, as its last hello said
        self.relay_workers = 1
        #: failed dials in a row (and tunnels closed before their hello) since the last hello
        self.failures = 0
        #: the relay sent GOAWAY on one of these tunnels since the last hello on a fresh one
        self.goaway_seen = False
        #: the whole group is on its way out (``leave``)
        self.leaving = False
        #: its loss has been counted against its node (connector.homes)
        self.struck = False
        #: dialing tasks by slot index; a retired slot stops redialing once its tunnel has closed
        self._tasks: dict[int, asyncio.Task] = {}
        self._retired: set[int] = set()

    # ------------------------------------------------------------------ what the worker asks

    def answered(self) -> list[Tunnel]:
        """The tunnels the relay has answered hello on (retiring ones included: they are still up)."""
        return [t for t in self.tunnels if t.info.hello]

    def streams_open(self) -> int:
        return sum(t.load for t in self.tunnels if not t.closed)

    def live(self) -> int:
        """Slots dialing or holding a tunnel, retired ones left out."""
        return len(self._live())

    @property
    def finished(self) -> bool:
        """Nothing dials and nothing is up any more."""
        return not self._tasks and not self.tunnels

    def view(self, failed_dials: int) -> nodes.GroupView:
        return group_view((t.info for t in self.tunnels), self.relay_workers, self.failures, self.goaway_seen, failed_dials)

    def start(self) -> None:
        for _ in range(self._settings().slots):
            self.add()

    def add(self) -> None:
        """One more slot, unless the worker holds ``max_slots`` already."""
        if self._room() and not self.leaving:
            index = next(self._numbers)
            self._tasks[index] = asyncio.create_task(self._slot(index))

    def resize(self) -> None:
        """Dial or retire slots to match ``settings.slots``, never leaving a relay worker uncovered."""
        if self.leaving:
            return
        settings = self._settings()
        live = self._live()
        want = min(settings.slots, settings.max_slots)
        for _ in range(want - len(live)):
            self.add()
        if len(live) <= want:
            return
        by_slot = self._by_slot()
        self._retire_slots(to_retire(live, want, {i: t.info for i, t in by_slot.items()}), by_slot)

    def leave(self) -> None:
        """Retire every slot: no more dialing here; tunnels get GOAWAY and close once idle."""
        self.leaving = True
        self._retire_slots(self._live(), self._by_slot())

    def _by_slot(self) -> dict[int, Tunnel]:
        """The tunnel each slot holds; a rotating one is no longer its slot's (it closes on its own)."""
        return {t.info.slot: t for t in self.tunnels if not t.info.rotating}

    def hello(self, tunnel: Tunnel, relay_worker: object, relay_workers: int, node: str | None = None) -> None:
        """The relay answered on ``tunnel``: it is up; cover every relay worker."""
        tunnel.info.hello = True
        tunnel.info.relay_worker = relay_worker
        tunnel.info.node = node
        self.relay_workers = relay_workers
        self.failures = 0
        self.goaway_seen = False
        self.struck = False
        if needs_another((t.info for t in self.tunnels), len(self._live()), self.relay_workers):
            self.add()
        self._changed()

    def goaway(self, tunnel: Tunnel) -> None:
        """The relay sent GOAWAY on ``tunnel`` (its node is draining)."""
        tunnel.info.relay_goaway = True
        self.goaway_seen = True
        self._changed()

    def rotate(self, tunnel: Tunnel, send: bool) -> None:
        """Rotate ``tunnel`` (its TLS keys are due, transport/rotation.py): GOAWAY "key rotation"
        unless the relay sent it (``send`` False), and its slot dials a successor now while
        it drains; the owner closes it once its streams end."""
        if tunnel.info.rotating:
            return
        tunnel.info.rotating = True
        if send:
            tunnel.goaway(ErrorCode.NO_ERROR, ROTATION_REASON)
        released = tunnel.info.released
        if released is not None and not released.done():
            released.set_result(None)
        self._changed()

    def up(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        if tunnel.info.slot in self._retired and not tunnel.info.retiring:
            self._retire(tunnel)  # its slot was retired while it was still connecting

    def down(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        for done in (tunnel.info.closed, tunnel.info.released):
            if done is not None and not done.done():
                done.set_result(None)
        if not tunnel.info.hello:
            self.failures += 1
        self._changed()

    def close(self) -> None:
        """No more dialing: cancel every slot (their tunnels are the worker's to close)."""
        self._closing = True
        for task in list(self._tasks.values()):
            task.cancel()

    # ------------------------------------------------------------------ slots

    def _live(self) -> list[int]:
        return [index for index in self._tasks if index not in self._retired]

    def _retire_slots(self, indexes: Iterable[int], by_slot: Mapping[int, Tunnel]) -> None:
        for index in indexes:
            self._retired.add(index)
            tunnel = by_slot.get(index)
            if tunnel is None:
                self._tasks[index].cancel()
            else:
                self._retire(tunnel)

    def _retire(self, tunnel: Tunnel) -> None:
        """No new streams on ``tunnel``; close it once its streams end or the drain deadline passes."""
        tunnel.info.retiring = True
        tunnel.goaway(ErrorCode.NO_ERROR, "the connector needs fewer tunnels")
        log.info("tunnel retired", extra={"tunnel": tunnel.name, "streams": tunnel.load})

        async def close_when_idle() -> None:
            end = time.monotonic() + self._settings().drain_timeout
            while tunnel.load and not tunnel.closed and time.monotonic() < end:
                await asyncio.sleep(0.1)
            tunnel.close(ErrorCode.NO_ERROR, "tunnel retired")

        asyncio.get_running_loop().create_task(close_when_idle())

    async def _slot(self, index: int) -> None:
        try:
            await self._dial_forever(index)
        finally:
            self._tasks.pop(index, None)
            self._retired.discard(index)
            if not self._closing:
                self._changed()

    async def _dial_forever(self, index: int) -> None:
        attempt = 0
        while not self._stopping.is_set() and not self._closing and index not in self._retired:
            settings = self._settings()
            name = f"{self._connector_id}/{settings.worker}.{index}"
            try:
                _, tunnel = await asyncio.wait_for(self._dial(index, name, settings), settings.connect_timeout)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ProxyError) as exc:
                delay = backoff_delay(settings.backoff, attempt)
                attempt += 1
                log.warning(
                    "tunnel connect failed; retrying",
                    extra={
                        "tunnel": name,
                        "relay": f"{self.host}:{self.port}",
                        "error": str(exc) or type(exc).__name__,
                        "retry_in": round(delay, 2),
                    },
                )
                self.failures += 1
                self._changed()
                await asyncio.sleep(delay)
                continue
            await (tunnel.info.released or tunnel.info.closed)
            if index in self._retired:
                return
            if tunnel.info.hello:
                attempt = 0
            delay = backoff_delay(self._settings().backoff, attempt)
            attempt += 1
            await asyncio.sleep(delay)

    async def _dial(self, index: int, name: str, settings: ConnectorSettings) -> tuple[asyncio.BaseTransport, Tunnel]:
        """Connect a tunnel to the relay, through the proxy when there is one."""
        loop = asyncio.get_running_loop()

        def factory() -> Tunnel:
            session = mux.Session(mux.Role.CONNECTOR, settings.flow, settings.keepalive)
            tunnel = Tunnel(session, self._owner, name=name, flow=settings.flow)
            tunnel.info = TunnelRecord(index, loop.create_future(), self, loop.create_future())
            return tunnel

        hostname = self.target.server_hostname
        if settings.proxy is not None:
            return await proxy_connect.open_tunnel(
                factory, settings.proxy, self.host, self.port, ssl_context=self._ssl(), server_hostname=hostname
            )
        return await fasttls.create_connection(settings.tls.transport, factory, self.host, self.port, self._ssl(), hostname)
