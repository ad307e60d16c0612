"""The control API's rollout: update leases and reports (connectors), rollout status,
pause/resume and group update settings (admin). docs/architecture.md, "Rollout"."""

from __future__ import annotations

import functools
import logging
from typing import Any

from aiohttp import web

from backhaul.config import RolloutSettings
from backhaul.control import validate
from backhaul.control.web import (
    ApiError,
    blocking,
    connector_identity,
    context_of,
    json_response,
    read_json,
    require_admin,
)
from backhaul.store import HALTING_STEPS, UPDATE_STEPS, LeaseRefused

log = logging.getLogger("backhaul.control.api")


# Connector calls authenticate with the client certificate, as the config pull does; the
# rest with the admin token.

#: The rollout's limits (config.RolloutSettings).
ROLLOUT = web.AppKey("backhaul_rollout_settings", RolloutSettings)
#: Update reports by step, this worker's: the relay publishes them as metrics (relay.metrics).
UPDATE_REPORTS = web.AppKey("backhaul_update_reports", dict)
#: Largest fencing token a request may name (the store's counter starts at 1 and grows by one per grant).
MAX_LEASE_TOKEN = validate.MAX_COUNTER


def rollout_for_group(store, group: str) -> dict[str, Any]:
    """The ``"rollout"`` part of GET /v1/updates for a connector of ``group`` (a blocking store call):
    whether its group's rollout is paused, and why it is halted (None: it is not)."""
    state = store.group_rollout(group, listed_failures=1)
    return {"paused": state.paused, "halted": state.halted}


def release_groups(store, versions: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The rollout of each release per group, for GET /v1/releases (a blocking store call):
    ``{version: {group: {connectors, on, updating, failed, rolled_back, halted}}}``.

    ``on`` counts the group's connectors that run the version, ``updating`` names the one
    holding the group's update lease for it, ``failed``/``rolled_back`` count the connectors
    where it failed, ``halted`` is the halt reason when this version halted the group.
    A group is listed when it has connectors or a failure of that version.
    """
    failures = store.update_failure_counts()
    names: dict[str, str] = {}
    out: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in versions}
    for state in store.list_rollouts(0):
        holder = None
        if state.lease is not None:
            if state.lease.connector_id not in names:
                record = store.get_connector(state.lease.connector_id)
                names[state.lease.connector_id] = record.name if record is not None else state.lease.connector_id
            holder = names[state.lease.connector_id]
        connectors = sum(state.versions.values())
        for version in versions:
            failed = failures.get((state.group, version, "failed"), 0)
            rolled_back = failures.get((state.group, version, "rolled_back"), 0)
            if not connectors and not failed and not rolled_back:
                continue
            out[version][state.group] = {
                "connectors": connectors,
                "on": state.versions.get(version, 0),
                "updating": holder if state.lease is not None and state.lease.version == version else None,
                "failed": failed,
                "rolled_back": rolled_back,
                "halted": state.halted if state.halted is not None and state.halted_version == version else None,
            }
    return out


def _lease_refused(exc: LeaseRefused) -> web.Response:
    return json_response({"error": "lease_refused", "detail": str(exc), "reason": exc.reason}, status=409)


def _report_version(body: dict[str, Any]) -> str:
    version = validate.text(body.get("version"), "version")
    if not version:
        raise ApiError(400, "bad_request", "version must name the release the update is for, e.g. \"1.4.0\"")
    return version


def _lease_token(value: Any) -> int:
    return validate.integer(value, "token", 1, MAX_LEASE_TOKEN)


async def update_lease(request: web.Request) -> web.Response:
    connector = await connector_identity(request)
    ctx = context_of(request)
    version = _report_version(await read_json(request))
    seconds = request.app[ROLLOUT].lease_seconds
    try:
        lease = await blocking(request, ctx.store.acquire_update_lease, connector.id, version, seconds)
    except LeaseRefused as exc:
        log.info(
            "update lease refused",
            extra={"connector_id": connector.id, "group": connector.group, "version": version, "reason": exc.reason, "detail": str(exc)},
        )
        return _lease_refused(exc)
    log.info(
        "update lease granted",
        extra={"connector_id": connector.id, "group": lease.group, "version": version, "token": lease.token, "expires": lease.expires},
    )
    return json_response(
        {"token": lease.token, "expires": lease.expires, "group": lease.group, "renew_every": request.app[ROLLOUT].renew_every}
    )


async def update_lease_renew(request: web.Request) -> web.Response:
    connector = await connector_identity(request)
    ctx = context_of(request)
    token = _lease_token((await read_json(request)).get("token"))
    try:
        lease = await blocking(request, ctx.store.renew_update_lease, connector.id, token, request.app[ROLLOUT].lease_seconds)
    except LeaseRefused as exc:
        log.warning(
            "update lease renewal refused: the lease is not held any more",
            extra={"connector_id": connector.id, "group": connector.group, "token": token, "reason": exc.reason},
        )
        return _lease_refused(exc)
    log.debug("update lease renewed", extra={"connector_id": connector.id, "token": token, "expires": lease.expires})
    return json_response({"expires": lease.expires})


async def update_report(request: web.Request) -> web.Response:
    connector = await connector_identity(request)
    ctx = context_of(request)
    body = await read_json(request)
    version = _report_version(body)
    step = body.get("step")
    if step not in UPDATE_STEPS:
        raise ApiError(400, "bad_request", f"step must be one of {', '.join(UPDATE_STEPS)}, not {step!r}")
    reason = validate.text(body.get("reason"), "reason")
    token = None if body.get("token") is None else _lease_token(body.get("token"))
    settings = request.app[ROLLOUT]
    outcome = await blocking(
        request,
        functools.partial(
            ctx.store.report_update, keep=settings.reports_per_connector, keep_failures=settings.failures_per_connector
        ),
        connector.id, version, step, reason, token,
    )
    counts = request.app[UPDATE_REPORTS]
    counts[step] = counts.get(step, 0) + 1
    # Every step goes to the relay's log, so the admin log tells each update's story.
    level = logging.WARNING if step in HALTING_STEPS or step == "refused" else logging.INFO
    log.log(
        level,
        "update step reported",
        extra={
            "connector_id": connector.id, "connector": connector.name, "group": outcome.group, "version": version,
            "step": step, "reason": reason, "token": token, "lease_released": outcome.released,
        },
    )
    if outcome.halted:
        log.warning(
            "rollout halted: an update failed",
            extra={"group": outcome.group, "connector_id": connector.id, "version": version, "step": step, "reason": reason},
        )
    return json_response({"status": "ok", "released": outcome.released, "halted": outcome.halted})


@require_admin
async def rollout_status(request: web.Request) -> web.Response:
    listed = request.app[ROLLOUT].listed_failures
    states = await blocking(request, context_of(request).store.list_rollouts, listed)
    return json_response([s.to_dict() for s in states])


def _rollout_target(body: dict[str, Any]) -> str | None:
    unknown = set(body) - {"group"}
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; send {{\"group\": NAME}} or {{}} for every group")
    group = body.get("group")
    return None if group is None else validate.name(group, "group")


@require_admin
async def rollout_pause(request: web.Request) -> web.Response:
    group = _rollout_target(await read_json(request))
    changed = await blocking(request, context_of(request).store.pause_rollout, group)
    log.info("rollout paused", extra={"group": group or "*", "groups": changed})
    return json_response({"paused": changed})


@require_admin
async def rollout_resume(request: web.Request) -> web.Response:
    group = _rollout_target(await read_json(request))
    changed = await blocking(request, context_of(request).store.resume_rollout, group)
    log.info("rollout resumed (pause and halt cleared)", extra={"group": group or "*", "groups": changed})
    return json_response({"resumed": changed})


@require_admin
async def group_updates(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await read_json(request)
    unknown = set(body) - {"allow_downtime", "window"}
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; a group's update settings are allow_downtime and window")
    changes: dict[str, Any] = {}
    if "allow_downtime" in body:
        changes["allow_downtime"] = validate.boolean(body["allow_downtime"], "allow_downtime")
    if "window" in body:
        changes["window"] = validate.window(body["window"])
    state = await blocking(request, context_of(request).store.set_group_updates, name, changes)
    log.info("group update settings changed", extra={"group": name, **changes})
    return json_response(state.to_dict())


@require_admin
async def connector_update_reports(request: web.Request) -> web.Response:
    store = context_of(request).store
    connector_id = request.match_info["id"]
    record = await blocking(request, store.get_connector, connector_id)
    if record is None or record.revoked:
        raise ApiError(404, "not_found", f"there is no connector {connector_id!r}; see `backhaul admin connector list`")
    reports = await blocking(request, store.update_reports, connector_id)
    return json_response([r.to_dict() for r in reports])


def add_routes(app: web.Application, settings: RolloutSettings, update_reports: dict[str, int] | None) -> None:
    app[ROLLOUT] = settings
    app[UPDATE_REPORTS] = update_reports if update_reports is not None else {}
    r = app.router
    r.add_post("/v1/updates/lease", update_lease)
    r.add_post("/v1/updates/lease/renew", update_lease_renew)
    r.add_post("/v1/updates/report", update_report)
    r.add_get("/v1/rollout", rollout_status)
    r.add_post("/v1/rollout/pause", rollout_pause)
    r.add_post("/v1/rollout/resume", rollout_resume)
    r.add_patch("/v1/groups/{name}/updates", group_updates)
    r.add_get("/v1/connectors/{id}/updates", connector_update_reports)


