"""What each admin-center page shows: filtered, paged rows built from the store's records.

Filtering and paging happen here, on the server, so a page renders ``size`` rows whatever
the fleet's size (bench/admin_center.py measures it at 1,000 connectors and 5,000 apps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from backhaul.config import AdminCenterSettings
from backhaul.store import App, Connector, OriginReport

T = TypeVar("T")
#: Connectors named per app on the apps page (the counts cover them all).
LISTED_REACH = 10
MAX_FILTER = 100


@dataclasses.dataclass(frozen=True)
class Paged:
    rows: list[Any]
    page: int
    pages: int
    total: int
    size: int


def page_args(query: Mapping[str, str], settings: AdminCenterSettings) -> tuple[int, int]:
    """(page, size) from ?page=&size=, clamped to what exists (bad numbers: the defaults)."""
    def number(name: str, default: int) -> int:
        try:
            return int(query.get(name, default))
        except ValueError:
            return default
    size = min(max(1, number("size", settings.page_size)), settings.max_page_size)
    return max(1, number("page", 1)), size


def paginate(items: Sequence[T], page: int, size: int) -> Paged:
    pages = max(1, math.ceil(len(items) / size))
    page = min(page, pages)
    return Paged(rows=list(items[(page - 1) * size: page * size]), page=page, pages=pages, total=len(items), size=size)


def filter_text(query: Mapping[str, str], name: str) -> str:
    return query.get(name, "").strip()[:MAX_FILTER]


def matching(items: Iterable[T], text: str, fields: Callable[[T], Iterable[Any]]) -> list[T]:
    if not text:
        return list(items)
    needle = text.lower()
    return [item for item in items if any(needle in str(f).lower() for f in fields(item) if f is not None)]


class Lifecycle:
    """Connectors' status as the admin API gives it at one moment: with the inactive grace,
    the inactive-since and removal dates (ControlSettings), so the page and `connector list` agree."""

    def __init__(self, now: float, settings) -> None:
        self.now = now  # wall-clock seconds the page is rendered at
        self.grace = settings.inactive_grace  # seconds a redialing connector stays "active"
        self.remove_after = settings.remove_inactive_after  # seconds unseen before housekeeping removes it

    def status(self, connector: Connector) -> str:
        return connector.status_at(self.now, self.grace)

    def row(self, connector: Connector) -> dict[str, Any]:
        return connector.lifecycle_dict(self.now, self.grace, self.remove_after)


def connector_rows(connectors: Iterable[Connector], group: str, status: str, text: str, life: Lifecycle) -> list[Connector]:
    """The connectors the page lists, filtered, by group then name (rows: ``connector_row``)."""
    picked = [
        c for c in connectors
        if not c.revoked and (not group or c.group == group) and (not status or life.status(c) == status)
    ]
    picked = matching(picked, text, lambda c: (c.name, c.id, c.hostname, c.version))
    picked.sort(key=lambda c: (c.group, c.name))
    return picked


def status_counts(connectors: Iterable[Connector], life: Lifecycle) -> dict[str, dict[str, int]]:
    """Per group: active and inactive connectors."""
    counts: dict[str, dict[str, int]] = {}
    for c in connectors:
        if not c.revoked:
            slot = counts.setdefault(c.group, {"active": 0, "inactive": 0})
            status = life.status(c)
            slot[status] = slot.get(status, 0) + 1
    return counts


def app_rows(apps: Iterable[App], group: str, kind: str, text: str) -> list[App]:
    """The apps the page lists, filtered, by name (rows: ``app_row``)."""
    picked = [a for a in apps if (not group or a.group == group) and (not kind or a.proto == kind)]
    picked = matching(picked, text, lambda a: (a.name, a.external_host, a.target, a.internal_url, a.port))
    picked.sort(key=lambda a: a.name)
    return picked


def app_row(app: App, reports: list[OriginReport]) -> dict[str, Any]:
    """A listed app with its address and which connectors reach it (the REACHABLE view)."""
    data = app.to_dict()
    data["address"] = app.external_host if app.proto == "http" else f":{app.port}"
    data["destination"] = app.internal_url if app.proto == "http" else app.target
    data["reach"] = {
        "active": len(reports),
        "reachable": sum(r.reachable is True for r in reports),
        "unreachable": sum(r.reachable is False for r in reports),
        "connectors": [{"name": r.connector, "reachable": r.reachable} for r in reports[:LISTED_REACH]],
    }
    return data
