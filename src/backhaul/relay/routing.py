"""Which tunnels a relay worker holds, by connector and group, and how one is chosen.

Each tunnel also carries what the connector worker behind it last said about the
origins of its apps (CONTROL ``health``, see connector/health.py): a tunnel whose
connector cannot reach an app gets no streams of that app. Unknown counts as reachable.
"""

from __future__ import annotations

import random
from typing import Iterable

from backhaul.control.validate import MAX_NAME
from backhaul.store.base import StoreLimits
from backhaul.transport.tunnel import Tunnel


#: Apps one tunnel may be reported unable to reach; more reports are ignored. As many
#: as the store allows apps, so only a misbehaving connector hits it.
MAX_DOWN_APPS = StoreLimits.max_apps
#: App names are at most this long; longer ones cannot be apps.
MAX_APP_NAME = MAX_NAME


class NoRoute(Exception):
    """No usable tunnel for the group: no active connector, all are draining, or none can reach the app."""

    def __init__(self, reason: str, unreachable: bool = False) -> None:
        super().__init__(reason)
        #: the group has usable tunnels, but their connectors reported the app's origin down
        self.unreachable = unreachable


class TunnelRecord:
    """What the relay keeps about one connector tunnel: ``Tunnel.info`` on the relay side.

    The worker makes it when it accepts the connection (before the tunnel is up, so the
    listen slot is released even for a tunnel that never comes up); the registry files
    the tunnel under its connector and group from it.
    """

    __slots__ = ("connector_id", "group", "listen_slot", "counted", "boot")

    def __init__(self, connector_id: str, group: str, listen_slot=None) -> None:
        self.connector_id = connector_id
        #: the connector's group (kept current by TunnelRegistry.set_group)
        self.group = group
        #: the listen port's place the connection holds (relay.accept.Slot), released once when it ends
        self.listen_slot = listen_slot
        #: the store counts this tunnel as usable (between tunnel up and its close or GOAWAY)
        self.counted = False
        #: the connector instance's boot id from its hello (None until then)
        self.boot: str | None = None

    def __repr__(self) -> str:
        return f"TunnelRecord({self.connector_id!r}, group={self.group!r}, counted={self.counted}, boot={self.boot!r})"


class TunnelRegistry:
    """The live tunnels of this worker, by connector; a tunnel's ``info`` is its TunnelRecord."""

    def __init__(self) -> None:
        self._by_connector: dict[str, set[Tunnel]] = {}
        self._group_of: dict[str, str] = {}
        #: apps whose origin the connector behind a tunnel reported unreachable
        self._down: dict[Tunnel, set[str]] = {}

    def add(self, tunnel: Tunnel) -> None:
        """File ``tunnel`` under its record's connector and group."""
        record: TunnelRecord = tunnel.info
        self._by_connector.setdefault(record.connector_id, set()).add(tunnel)
        self._group_of[record.connector_id] = record.group

    def remove(self, tunnel: Tunnel) -> None:
        """Forget ``tunnel`` (one never filed, without a record even, is left as it is)."""
        record: TunnelRecord | None = tunnel.info
        if record is None:
            return
        connector_id = record.connector_id
        tunnels = self._by_connector.get(connector_id)
        if tunnels is None:
            return
        tunnels.discard(tunnel)
        self._down.pop(tunnel, None)
        if not tunnels:
            del self._by_connector[connector_id]
            self._group_of.pop(connector_id, None)

    def set_group(self, connector_id: str, group: str) -> None:
        if connector_id in self._group_of:
            self._group_of[connector_id] = group
            for tunnel in self._by_connector[connector_id]:
                tunnel.info.group = group

    def connectors(self) -> list[str]:
        return list(self._by_connector)

    def tunnels(self, connector_id: str | None = None) -> list[Tunnel]:
        if connector_id is not None:
            return list(self._by_connector.get(connector_id, ()))
        return [t for tunnels in self._by_connector.values() for t in tunnels]

    def report_health(self, tunnel: Tunnel, apps: dict) -> int:
        """Record ``{app: true | false | null}`` from the connector behind ``tunnel``
        (false: cannot reach the app's origin). Returns how many entries were ignored:
        malformed ones, and new unreachable apps beyond MAX_DOWN_APPS."""
        if tunnel not in self._by_connector.get(tunnel.info.connector_id, ()):
            return len(apps)
        down = self._down.get(tunnel) or set()
        ignored = 0
        for name, up in apps.items():
            if not isinstance(name, str) or len(name) > MAX_APP_NAME or up not in (True, False, None):
                ignored += 1
            elif up is False:
                if name not in down and len(down) >= MAX_DOWN_APPS:
                    ignored += 1
                else:
                    down.add(name)
            else:
                down.discard(name)
        if down:
            self._down[tunnel] = down
        else:
            self._down.pop(tunnel, None)
        return ignored

    def pick(self, group: str, exclude: Iterable[Tunnel] = (), app: str | None = None) -> Tunnel:
        """A usable tunnel of ``group``: of the connector with the fewest active streams in
        this worker, its tunnel with the fewest.

        Load is balanced per connector, not per tunnel: a connector with more tunnels here
        (it dialed more, or more of its tunnels landed on this worker) gets no more streams
        than its peers. Tunnels already tried (``exclude``) are skipped, and their connectors
        are taken only when no other connector is left, so a retry goes to another connector
        when the group has one. With ``app``, tunnels whose connector reported that app's
        origin unreachable are skipped. Ties are broken at random: short streams leave most
        connectors at zero load, and a fixed order would send them all to one (one that
        comes back would get nothing).
        """
        excluded = set(exclude)
        tried_connectors = {t.info.connector_id for t in excluded}
        down = self._down if app is not None else None
        unreachable = False
        fresh: list[tuple[int, list[Tunnel]]] = []
        tried: list[tuple[int, list[Tunnel]]] = []
        for connector_id, tunnels in self._by_connector.items():
            if self._group_of.get(connector_id) != group:
                continue
            usable: list[Tunnel] = []
            load = 0
            for tunnel in tunnels:
                load += tunnel.load
                if tunnel in excluded or not tunnel.usable:
                    continue
                if down and app in down.get(tunnel, ()):
                    unreachable = True
                    continue
                usable.append(tunnel)
            if usable:
                (tried if connector_id in tried_connectors else fresh).append((load, usable))
        candidates = fresh or tried
        if not candidates:
            if unreachable:
                raise NoRoute(f"no connector in group {group!r} can reach app {app!r}", unreachable=True)
            raise NoRoute(f"no active connector in group {group!r}")
        least = min(load for load, _ in candidates)
        _, tunnels = random.choice([c for c in candidates if c[0] == least])
        least = min(t.load for t in tunnels)
        return random.choice([t for t in tunnels if t.load == least])
