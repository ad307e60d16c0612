"""What each admin-center page shows, read from the store: one builder per page, each
returning its template's data (rows filtered and paged by views.py)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp import web

from backhaul.center import adminlog, views
from backhaul.center.keys import LOG_DIR, RECORDS, SAMPLES, SETTINGS, TRAFFIC
from backhaul.center.samples import ByteSamples
from backhaul.control.web import blocking, context_of


def _log_entries(request: web.Request, level: str, text: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    settings = request.app[SETTINGS]
    return adminlog.entries(request.app[RECORDS], request.app.get(LOG_DIR), limit, settings.log_tail_bytes, level, text)


def _lifecycle(request: web.Request) -> views.Lifecycle:
    ctx = context_of(request)
    return views.Lifecycle(ctx.clock(), ctx.settings)


async def _sample(request: web.Request, connectors) -> ByteSamples:
    """The charts' samples, with one more taken unless the last is recent: the relay's own
    counters of the connectors' tunnels through this node, as they carry the bytes (the
    heartbeat counters in the store move only every heartbeat), else the store's."""
    samples = request.app[SAMPLES]
    now = time.monotonic()
    if not samples.due(now):
        return samples
    traffic = request.app.get(TRAFFIC)
    if traffic is not None:
        counted = await blocking(request, traffic)
        counters = ((c.id, counted.get(c.id, 0)) for c in connectors if not c.revoked)
    else:
        counters = ((c.id, c.bytes_in + c.bytes_out) for c in connectors if not c.revoked)
    samples.record(now, counters)
    return samples


async def overview(request: web.Request) -> dict[str, Any]:
    store = context_of(request).store
    nodes = await blocking(request, store.list_nodes, store.cluster.node_fresh)
    connectors = await blocking(request, store.list_connectors)
    groups = await blocking(request, store.list_groups)
    apps = await blocking(request, store.list_apps)
    tokens = await blocking(request, store.list_tokens)
    samples = await _sample(request, connectors)
    rates = samples.rates(samples.totals)
    recent, source = _log_entries(request, "warning", "", 10)
    return {
        "nodes": [n.to_dict() for n in nodes],
        "counts": views.status_counts(connectors, _lifecycle(request)),
        "groups": groups,
        "apps": len(apps),
        "tokens": len(tokens),
        "chart": samples.chart_of(None),
        "rate": rates[-1] if rates else None,
        "recent": recent[:10],
        "log_source": source,
    }


async def connectors_page(request: web.Request) -> dict[str, Any]:
    store = context_of(request).store
    q = request.query
    connectors = await blocking(request, store.list_connectors)
    groups = await blocking(request, store.list_groups)
    samples = await _sample(request, connectors)
    life = _lifecycle(request)
    rows = views.connector_rows(connectors, views.filter_text(q, "group"), views.filter_text(q, "status"), views.filter_text(q, "q"), life)
    paged = views.paginate(rows, *views.page_args(q, request.app[SETTINGS]))
    listed = []
    for connector in paged.rows:
        row = life.row(connector)
        row["rate"] = samples.rate_of(connector.id)
        row["chart"] = samples.chart_of(connector.id)
        listed.append(row)
    paged = dataclasses.replace(paged, rows=listed)
    return {"paged": paged, "groups": groups, "counts": views.status_counts(connectors, _lifecycle(request))}


async def apps_page(request: web.Request) -> dict[str, Any]:
    store = context_of(request).store
    q = request.query
    apps = await blocking(request, store.list_apps)
    health = await blocking(request, store.origin_health)
    groups = await blocking(request, store.list_groups)
    rows = views.app_rows(apps, views.filter_text(q, "group"), views.filter_text(q, "kind"), views.filter_text(q, "q"))
    paged = views.paginate(rows, *views.page_args(q, request.app[SETTINGS]))
    paged = dataclasses.replace(paged, rows=[views.app_row(a, health.get(a.name, [])) for a in paged.rows])
    return {"paged": paged, "groups": groups}


async def groups_page(request: web.Request) -> dict[str, Any]:
    store = context_of(request).store
    groups = await blocking(request, store.list_groups)
    connectors = await blocking(request, store.list_connectors)
    return {"groups": groups, "counts": views.status_counts(connectors, _lifecycle(request))}


async def tokens_page(request: web.Request) -> dict[str, Any]:
    store = context_of(request).store
    tokens = await blocking(request, store.list_tokens)
    groups = await blocking(request, store.list_groups)
    rows = sorted((t.to_dict() for t in tokens), key=lambda t: t["expires"])
    return {"paged": views.paginate(rows, *views.page_args(request.query, request.app[SETTINGS])), "groups": groups}


async def releases_page(request: web.Request) -> dict[str, Any]:
    store = context_of(request).store
    releases = await blocking(request, store.list_releases)
    rollouts = await blocking(request, store.list_rollouts, 10)
    return {"releases": [r.to_dict() for r in releases], "rollouts": [r.to_dict() for r in rollouts]}


async def log_page(request: web.Request) -> dict[str, Any]:
    q = request.query
    level = views.filter_text(q, "level")
    found, source = _log_entries(request, level, views.filter_text(q, "q"), request.app[SETTINGS].log_records)
    rows = [
        {"ts": e.get("ts"), "level": e.get("level", ""), "msg": e.get("msg", ""),
         "fields": {k: v for k, v in e.items() if k not in ("ts", "level", "msg", "logger", "pid")}}
        for e in found
    ]
    return {"paged": views.paginate(rows, *views.page_args(q, request.app[SETTINGS])), "levels": adminlog.LEVELS, "log_source": source}


BUILDERS = {
    "": overview, "connectors": connectors_page, "apps": apps_page, "groups": groups_page,
    "tokens": tokens_page, "releases": releases_page, "log": log_page,
}
