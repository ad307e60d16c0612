"""What a relay worker last read of its connectors, so it can go on without the store.

With several nodes the store is a PostgreSQL server that can go away for a while. The
worker then keeps relaying with what it knows: a connector that redials (its tunnel broke,
it restarted) is accepted on the record last read for it, the way it was accepted before;
one never seen is refused until the store answers again. Records come from every lookup
and every reload, so the ones kept are the connectors this worker actually serves.
"""

from __future__ import annotations

import collections

from backhaul.store.base import Connector


class KnownConnectors:
    """The newest connector records looked up, at most ``limit`` (least recently used go)."""

    __slots__ = ("_records", "_limit")

    def __init__(self, limit: int) -> None:
        #: connector id -> its record as last read (a deleted connector is dropped)
        self._records: collections.OrderedDict[str, Connector] = collections.OrderedDict()
        #: bound of the table: the store's own limit on connectors, so it never drops a live one
        self._limit = limit

    def remember(self, connector_id: str, record: Connector | None) -> None:
        """The store's answer for ``connector_id`` (None: there is no such connector)."""
        if record is None:
            self._records.pop(connector_id, None)
            return
        self._records[connector_id] = record
        self._records.move_to_end(connector_id)
        while len(self._records) > self._limit:
            self._records.popitem(last=False)

    def get(self, connector_id: str) -> Connector | None:
        record = self._records.get(connector_id)
        if record is not None:
            self._records.move_to_end(connector_id)
        return record

    def __len__(self) -> int:
        return len(self._records)
