"""Which tunnels a relay worker holds, by connector and group, and how one is chosen."""

from __future__ import annotations

import random
from typing import Iterable

from backhaul.transport.tunnel import Tunnel


class NoRoute(Exception):
    """No usable tunnel for the group: no active connector, or all are draining."""


class TunnelRegistry:
    """The live tunnels of this worker. A tunnel's ``info`` holds its connector id and group."""

    def __init__(self) -> None:
        self._by_connector: dict[str, set[Tunnel]] = {}
        self._group_of: dict[str, str] = {}

    def add(self, tunnel: Tunnel, connector_id: str, group: str) -> None:
        self._by_connector.setdefault(connector_id, set()).add(tunnel)
        self._group_of[connector_id] = group

    def remove(self, tunnel: Tunnel) -> None:
        connector_id = tunnel.info.get("connector_id")
        tunnels = self._by_connector.get(connector_id)
        if tunnels is None:
            return
        tunnels.discard(tunnel)
        if not tunnels:
            del self._by_connector[connector_id]
            self._group_of.pop(connector_id, None)

    def set_group(self, connector_id: str, group: str) -> None:
        if connector_id in self._group_of:
            self._group_of[connector_id] = group

    def connectors(self) -> list[str]:
        return list(self._by_connector)

    def tunnels(self, connector_id: str | None = None) -> list[Tunnel]:
        if connector_id is not None:
            return list(self._by_connector.get(connector_id, ()))
        return [t for tunnels in self._by_connector.values() for t in tunnels]

    def pick(self, group: str, exclude: Iterable[Tunnel] = ()) -> Tunnel:
        """The usable tunnel of ``group`` with the fewest active streams.

        Tunnels of connectors already tried (``exclude``) are skipped, so a retry goes to
        another connector when the group has one, else to another tunnel. Ties are broken
        at random: short streams leave most tunnels at zero load, and a fixed order would
        send them all to one connector (a connector that comes back would get nothing).
        """
        excluded = set(exclude)
        tried_connectors = {t.info.get("connector_id") for t in excluded}
        fresh: list[Tunnel] = []
        tried: list[Tunnel] = []
        for connector_id, tunnels in self._by_connector.items():
            if self._group_of.get(connector_id) != group:
                continue
            for tunnel in tunnels:
                if tunnel in excluded or not tunnel.usable:
                    continue
                (tried if connector_id in tried_connectors else fresh).append(tunnel)
        candidates = fresh or tried
        if not candidates:
            raise NoRoute(f"no active connector in group {group!r}")
        least = min(t.load for t in candidates)
        return random.choice([t for t in candidates if t.load == least])
