"""Which relay nodes a connector worker holds tunnels to, and when it moves: pure decisions.

A service of several relay nodes tells its connectors which nodes are up: the relay's
``hello`` (``node``: the node that answered; ``nodes``: [{"id", "listen": "HOST:PORT"}])
and the pulled config (``nodes``, the same shape). ``parse_nodes`` turns what arrived
into checked ``NodeAddress`` records.

With fewer than two nodes listed the worker dials its enrolled address only, exactly as a
connector of a one-node service does. With two or more it holds tunnels to
``relay_nodes`` distinct nodes at their own addresses (``choose_nodes``): the nodes it
holds already stay while they serve (a connector never moves for no reason); the rest
are the best by rendezvous hashing of the connector id and the node id (``rank``), so
connectors spread evenly over the nodes and a node that joins or leaves moves only the
connectors it concerns. A node that was lost (``NodeStrikes``) is avoided for a while.

``plan`` gives, from what the worker's tunnel groups are (``GroupView``, one group per
address), the addresses to hold and the groups to retire. The enrolled address (which
may be a load balancer) is held while the chosen nodes are not all ready, so the worker
never holds fewer serving tunnels during a move than it had; a group that still serves
is retired only once every group held is ready.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
from typing import Iterable, Mapping

from backhaul import pki
from backhaul.config import Backoff
from backhaul.errors import ConfigError
from backhaul.transport.sockets import parse_hostport

log = logging.getLogger("backhaul.connector")

#: (host, port) a tunnel group dials
Address = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class NodeAddress:
    """One up relay node as the service lists it: its id and the address connectors dial."""

    id: str
    host: str
    port: int

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """Its control API (the same port as its tunnels)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a tunnel group dials, and the name its TLS certificate must carry."""

    host: str
    port: int
    #: checked against the relay's certificate: a node's certificate carries its own names
    server_hostname: str

    @property
    def address(self) -> Address:
        return (self.host, self.port)


@dataclasses.dataclass(frozen=True)
class GroupView:
    """What the decisions need to know of one tunnel group (see slots.group_view)."""

    #: tunnels up, answered, not retiring and not told GOAWAY by the relay
    serving: int
    #: serving tunnels cover every relay worker of the node they reached
    ready: bool
    #: it held nothing serving and lost its node: GOAWAY from it, or dials failing in a row
    lost: bool
    #: node ids the hellos on its serving tunnels named (several behind a load balancer)
    reached: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Plan:
    hold: tuple[Target, ...]
    retire: tuple[Address, ...]


def parse_nodes(raw: object, limit: int, source: str) -> list[NodeAddress] | None:
    """The checked node list in ``raw`` (from a hello or the config); None when there is none.

    Entries that are not {"id": node id, "listen": "HOST:PORT"} with a dialable host are
    left out and logged; so are repeated addresses and ids, and entries beyond ``limit``."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        log.warning("relay node list ignored: not a list", extra={"source": source, "nodes": repr(raw)[:200]})
        return None
    nodes: list[NodeAddress] = []
    seen: set[object] = set()
    for entry in raw:
        problem = None
        node = None
        if len(nodes) >= limit:
            problem = f"more than {limit} nodes listed"
        elif not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("listen"), str):
            problem = 'not {"id": ..., "listen": "HOST:PORT"}'
        elif not pki.is_node_id(entry["id"]):
            problem = "not a node id"
        else:
            try:
                host, port = parse_hostport(entry["listen"], "node listen address")
            except ConfigError as exc:
                problem = str(exc)
            else:
                if port == 0 or _unspecified(host):
                    problem = "not an address a connector can dial"
                elif entry["id"] in seen or (host, port) in seen:
                    problem = "a node id or address listed twice"
                else:
                    node = NodeAddress(entry["id"], host, port)
        if node is None:
            log.warning("relay node entry ignored", extra={"source": source, "entry": repr(entry)[:200], "reason": problem})
            continue
        seen.update((node.id, node.address))
        nodes.append(node)
    return nodes


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a DNS name


def score(connector_id: str, node_id: str) -> int:
    """The rendezvous (highest random weight) score of a node for a connector."""
    digest = hashlib.blake2b(f"{connector_id}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(connector_id: str, nodes: Iterable[NodeAddress]) -> list[NodeAddress]:
    """``nodes`` best first for this connector: the same order on every worker and every run."""
    return sorted(nodes, key=lambda n: (-score(connector_id, n.id), n.id))


def choose_nodes(
    connector_id: str, nodes: Iterable[NodeAddress], want: int, held: set[str], avoid: set[str]
) -> list[NodeAddress]:
    """The ``want`` nodes to hold: those ``held`` already (unless avoided), then the best
    ranked of the others, then avoided ones when nothing else is up (a node that failed
    beats no node)."""
    ranked = rank(connector_id, nodes)
    keep = [n for n in ranked if n.id in held and n.id not in avoid][:want]
    fresh = [n for n in ranked if n not in keep and n.id not in avoid]
    avoided = [n for n in ranked if n not in keep and n.id in avoid]
    return (keep + fresh + avoided)[:want]


def plan(
    connector_id: str,
    want: int,
    nodes: list[NodeAddress],
    enrolled: Target,
    views: Mapping[Address, GroupView],
    avoid: set[str],
) -> Plan:
    """Addresses to hold and groups to retire, from the node list and the groups there are.

    ``views`` has one entry per group the worker holds now, by address."""
    if len(nodes) < 2:
        hold = [enrolled]
    else:
        listed = {n.address: n for n in nodes}
        held = {listed[a].id for a in views if a in listed}
        if not held:
            # Only the enrolled address so far (a load balancer): the nodes it reached are
            # the ones to go on with, so the move to direct addresses changes no node.
            held = set().union(*(v.reached for v in views.values())) if views else set()
        hold = [Target(n.host, n.port, n.host) for n in choose_nodes(connector_id, nodes, want, held, avoid)]
        if enrolled.address not in {t.address for t in hold} and not all(_ready(views, t.address) for t in hold):
            hold.append(enrolled)
    addresses = {t.address for t in hold}
    all_ready = all(_ready(views, a) for a in addresses)
    retire = tuple(a for a, v in views.items() if a not in addresses and (v.serving == 0 or all_ready))
    return Plan(tuple(hold), retire)


def _ready(views: Mapping[Address, GroupView], address: Address) -> bool:
    view = views.get(address)
    return view is not None and view.ready


class NodeStrikes:
    """Nodes lost lately, each avoided for a while that doubles per loss in a row.

    Time is passed in (seconds, monotonic). At most ``limit`` nodes are remembered; the
    one whose avoidance ends first is forgotten first."""

    def __init__(self, backoff: Backoff, limit: int) -> None:
        self._backoff = backoff
        self._limit = limit
        #: node id -> (losses in a row, avoided until)
        self._nodes: dict[str, tuple[int, float]] = {}

    def strike(self, node_id: str, now: float) -> float:
        """``node_id`` was lost: avoid it; returns until when."""
        count = self._nodes.get(node_id, (0, 0.0))[0] + 1
        b = self._backoff
        until = now + min(b.maximum, b.initial * b.factor ** (count - 1))
        self._nodes[node_id] = (count, until)
        while len(self._nodes) > self._limit:
            del self._nodes[min(self._nodes, key=lambda k: self._nodes[k][1])]
        return until

    def clear(self, node_id: str) -> None:
        """``node_id`` answered: it is good again."""
        self._nodes.pop(node_id, None)

    def avoided(self, now: float) -> set[str]:
        return {node for node, (_, until) in self._nodes.items() if until > now}

    def __len__(self) -> int:
        return len(self._nodes)
