"""The control API's releases: upload (admin), list and revoke, and what connectors fetch
(``GET /v1/updates``, the files). docs/architecture.md, "Releases"."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import re
from typing import Any

import orjson
from aiohttp import web
from packaging.version import Version

from backhaul.config import ReleaseLimits
from backhaul.control.rollout_api import release_groups, rollout_for_group
from backhaul.control.web import (
    ApiError,
    blocking,
    connector_identity,
    context_of,
    json_response,
    peer_of,
    read_json,
    require_admin,
)
from backhaul.errors import ConfigError
from backhaul.release import keys as release_keys, manifest as release_manifest
from backhaul.release.manifest import ReleaseRefused
from backhaul.store import Connector, Release, ReleaseFile, StoreError

log = logging.getLogger("backhaul.control.api")


# -- releases (signed connector releases: backhaul.release; the relay stores and serves them,
# it checks each signature with the public key sent along, and holds no signing key)

#: Longest PEM public key accepted with an upload (an Ed25519 one is 113 bytes).
MAX_PUBLIC_KEY = 4096
_RELEASE_FIELDS = {"manifest", "signature", "public_key", "auto"}
_VERSION_RE = re.compile(release_manifest.VERSION_PATTERN)


def _b64_limit(size: int) -> int:
    """Length of the base64 text of ``size`` bytes."""
    return (size + 2) // 3 * 4


def _b64(value: Any, field: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > _b64_limit(limit):
        raise ApiError(400, "bad_request", f"{field} must be base64 text of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_request", f"{field} is not valid base64") from None


def _release_refused(request: web.Request, exc: ReleaseRefused, **extra: Any) -> web.Response:
    log.warning("release refused", extra={"reason": exc.reason, "detail": str(exc), "peer": peer_of(request), **extra})
    return json_response({"error": "release_refused", "reason": exc.reason, "detail": str(exc)}, status=400)


def _check_release_limits(manifest: release_manifest.Manifest, limits: ReleaseLimits) -> None:
    if len(manifest.files) > limits.max_files:
        raise ReleaseRefused("too_large", f"a release has at most {limits.max_files} files on this relay, this one {len(manifest.files)}")
    for entry in manifest.files:
        if entry.size > limits.max_file_size:
            raise ReleaseRefused("too_large", f"{entry.name} is {entry.size} bytes; files of a release are at most {limits.max_file_size}")
    total = sum(f.size for f in manifest.files)
    if total > limits.max_release_size:
        raise ReleaseRefused("too_large", f"the release is {total} bytes in all; at most {limits.max_release_size}")


@require_admin
async def create_release(request: web.Request) -> web.Response:
    """Store a signed manifest; its files follow, one PUT each (a wheelhouse is tens of MB)."""
    ctx = context_of(request)
    limits = ctx.settings.releases
    body = await read_json(request)
    unknown = set(body) - _RELEASE_FIELDS
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; see GET /v1/openapi.json")
    manifest_bytes = _b64(body.get("manifest"), "manifest", limits.max_manifest)
    signature = _b64(body.get("signature"), "signature", release_manifest.SIGNATURE_SIZE)
    pem = body.get("public_key")
    if not isinstance(pem, str) or len(pem) > MAX_PUBLIC_KEY:
        raise ApiError(400, "bad_request", "public_key must be the publisher's PEM public key (`backhaul release keygen --public`)")
    auto = body.get("auto", False)
    if not isinstance(auto, bool):
        raise ApiError(400, "bad_request", "auto must be true or false")
    if len(manifest_bytes) > limits.max_manifest:
        raise ApiError(400, "bad_request", f"the manifest is larger than {limits.max_manifest} bytes")
    try:
        public = release_keys.parse_public(pem.encode("ascii", "replace"), "public_key")
    except ConfigError as exc:
        return _release_refused(request, ReleaseRefused("bad_key", str(exc)))
    sent_id = release_manifest.key_id(public)
    try:
        manifest = release_manifest.Manifest.from_bytes(manifest_bytes)
        if manifest.key_id != sent_id:
            raise ReleaseRefused(
                "unknown_key", f"the manifest names signing key {manifest.key_id}, but the public key sent is {sent_id}"
            )
        # The same checks a connector makes (but the version: the relay has no installed one).
        manifest = release_manifest.verify(manifest_bytes, signature, [public], now=ctx.clock(), installed=None)
        release_manifest.check_project_wheel(manifest)
        _check_release_limits(manifest, limits)
    except ReleaseRefused as exc:
        return _release_refused(request, exc, key_id=sent_id)
    record = Release(
        version=manifest.version,
        manifest=manifest_bytes,
        signature=signature,
        public_key=release_keys.public_pem(public).decode("ascii"),
        key_id=manifest.key_id,
        issued=manifest.issued,
        expires=manifest.expires,
        auto=auto,
        state="incomplete",
        created=ctx.clock(),
        files=tuple(ReleaseFile(f.name, f.sha256, f.size) for f in manifest.files),
    )
    stored, created = await blocking(
        request, functools.partial(ctx.store.create_release, record, max_stored=limits.max_stored, max_records=limits.max_records)
    )
    log.info(
        "release stored; waiting for its files" if created else "release upload resumed",
        extra={"version": stored.version, "key_id": stored.key_id, "auto": stored.auto, "files": len(stored.files), "size": stored.size},
    )
    return json_response(stored.to_dict(), status=201 if created else 200)


@require_admin
async def list_releases(request: web.Request) -> web.Response:
    store = context_of(request).store
    releases = await blocking(request, store.list_releases)
    groups = await blocking(request, release_groups, store, [r.version for r in releases])
    return json_response([{**r.to_dict(), "groups": groups[r.version]} for r in releases])


@require_admin
async def revoke_release(request: web.Request) -> web.Response:
    version = request.match_info["version"]
    release = await blocking(request, context_of(request).store.revoke_release, version)
    log.warning("release revoked: it is never served again", extra={"version": release.version})
    return json_response({"revoked": release.version})


async def _refuse_upload(request: web.Request, status: int, payload: dict[str, Any]) -> web.StreamResponse:
    """Answer, then close the connection: aiohttp would otherwise read (and drop) the rest
    of the body to keep the connection, and nothing past the manifest's size is read."""
    response = web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


@require_admin
async def upload_release_file(request: web.Request) -> web.StreamResponse:
    """One file of an incomplete release, as a raw body of exactly the manifest's size."""
    ctx = context_of(request)
    version, name = request.match_info["version"], request.match_info["name"]
    release: Release | None = await blocking(request, ctx.store.get_release, version)
    entry = next((f for f in release.files if f.name == name), None) if release is not None else None
    if release is None or entry is None:
        raise ApiError(404, "not_found", f"there is no release {version!r} with a file {name!r}; POST /v1/releases with its manifest first")
    if release.state == "revoked":
        raise ApiError(410, "revoked", f"release {version} is revoked")
    declared = request.content_length
    if declared is not None and declared != entry.size:
        refused = ReleaseRefused("bad_size", f"{name} is {entry.size} bytes in the signed manifest; the upload says {declared}")
        log.warning("release file refused", extra={"version": version, "file": name, "reason": "bad_size", "sent": declared})
        status = 413 if declared > entry.size else 400
        return await _refuse_upload(request, status, {"error": "release_refused", "reason": refused.reason, "detail": str(refused)})
    upload = await blocking(request, ctx.store.begin_file_upload, version, name)
    chunk_size = ctx.settings.releases.chunk_size
    digest = hashlib.sha256()
    received, seq = 0, 0
    buffer = bytearray()
    try:
        while True:
            # Never more than one byte past the size: that byte alone proves the body is too long.
            want = min(chunk_size - len(buffer), entry.size + 1 - received)
            piece = await request.content.read(want) if want > 0 else b""
            if piece:
                received += len(piece)
                buffer += piece
            if received > entry.size:
                await blocking(request, ctx.store.abort_file_upload, version, name, upload)
                log.warning("release file refused", extra={"version": version, "file": name, "reason": "bad_size", "sent": received})
                detail = f"{name} is longer than the {entry.size} bytes the signed manifest says; nothing past that was read"
                return await _refuse_upload(request, 413, {"error": "release_refused", "reason": "bad_size", "detail": detail})
            if buffer and (len(buffer) >= chunk_size or not piece):
                digest.update(buffer)
                await blocking(request, ctx.store.put_file_chunk, version, name, upload, seq, bytes(buffer))
                seq += 1
                buffer.clear()
            if not piece:
                break
    except BaseException:
        # A broken connection, a store error: drop what came so far; the next PUT starts over.
        with contextlib.suppress(StoreError):
            await asyncio.shield(blocking(request, ctx.store.abort_file_upload, version, name, upload))
        raise
    try:
        if received != entry.size:
            raise ReleaseRefused("bad_size", f"{name} came with {received} bytes; the signed manifest says {entry.size}")
        if digest.hexdigest() != entry.sha256:
            raise ReleaseRefused("bad_hash", f"{name} has sha256 {digest.hexdigest()}; the signed manifest says {entry.sha256}")
    except ReleaseRefused as exc:
        await blocking(request, ctx.store.abort_file_upload, version, name, upload)
        return _release_refused(request, exc, version=version, file=name)
    stored = await blocking(request, ctx.store.finish_file_upload, version, name, upload)
    log.info("release file stored", extra={"version": version, "file": name, "size": entry.size, "state": stored.state})
    if stored.state == "published":
        log.info("release published", extra={"version": version, "auto": stored.auto, "files": len(stored.files)})
    return json_response({"version": version, "name": name, "state": stored.state, "missing": stored.missing})


def _query_version(request: web.Request, key: str) -> str | None:
    value = request.query.get(key)
    if value is None:
        return None
    if len(value) > release_manifest.MAX_VERSION or not _VERSION_RE.fullmatch(value):
        raise ApiError(400, "bad_request", f"{key} must be a PEP 440 version in normal form, e.g. 1.2.0")
    return value


def _newest(releases: list[Release], installed: str | None, now: float) -> Release | None:
    """The newest published, unexpired release newer than ``installed`` (PEP 440 order)."""
    floor = Version(installed) if installed is not None else None
    best: Release | None = None
    for release in releases:
        if release.state != "published" or release.expires <= now:
            continue
        version = Version(release.version)
        if floor is not None and version <= floor:
            continue
        if best is None or version > Version(best.version):
            best = release
    return best


async def _updates_answer(request: web.Request, connector: Connector, release: Release | None) -> dict[str, Any]:
    """The answer of GET /v1/updates for ``connector``: the release it should look at, if any.

    Everything a connector needs to decide is in it (the signed manifest and signature, which
    it checks against its own pinned keys); ``auto`` is the admin's choice of rolling it out
    without a person. The rollout state of the connector's group is added here too.
    """
    answer: dict[str, Any] = {"release": None}
    if release is not None:
        answer["release"] = {
            "version": release.version,
            "manifest": base64.b64encode(release.manifest).decode("ascii"),
            "signature": base64.b64encode(release.signature).decode("ascii"),
            "auto": release.auto,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in release.files],
        }
    answer["rollout"] = await blocking(request, rollout_for_group, context_of(request).store, connector.group)
    return answer


async def connector_updates(request: web.Request) -> web.Response:
    connector = await connector_identity(request)
    ctx = context_of(request)
    wanted = _query_version(request, "version")
    installed = _query_version(request, "installed")
    if wanted is not None:
        release = await blocking(request, ctx.store.get_release, wanted)
        if release is None or release.state == "incomplete":
            raise ApiError(404, "not_found", f"there is no published release {wanted}")
        if release.state == "revoked":
            raise ApiError(410, "revoked", f"release {wanted} is revoked: do not install it")
    else:
        release = _newest(await blocking(request, ctx.store.list_releases), installed, ctx.clock())
    return json_response(await _updates_answer(request, connector, release), headers={"Cache-Control": "no-cache"})


async def connector_release_file(request: web.Request) -> web.StreamResponse:
    """The bytes of one file of a published release, a stored chunk at a time."""
    await connector_identity(request)
    ctx = context_of(request)
    version, name = request.match_info["version"], request.match_info["name"]
    release: Release | None = await blocking(request, ctx.store.get_release, version)
    entry = next((f for f in release.files if f.name == name), None) if release is not None else None
    if release is not None and release.state == "revoked":
        raise ApiError(410, "revoked", f"release {version} is revoked: do not install it")
    if release is None or entry is None or release.state != "published":
        raise ApiError(404, "not_found", f"there is no published release {version!r} with a file {name!r}")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-cache"})
    response.content_length = entry.size
    await response.prepare(request)
    sent, seq = 0, 0
    while sent < entry.size:
        chunk = await blocking(request, ctx.store.read_file_chunk, version, name, seq)
        if chunk is None or sent + len(chunk) > entry.size:
            # Revoked while it was being sent: cut the body short, so the client cannot take
            # it for whole (it checks the size and SHA-256 anyway).
            log.warning("release file cut short: revoked while it was served", extra={"version": version, "file": name})
            request.protocol.force_close()
            return response
        await response.write(chunk)
        sent += len(chunk)
        seq += 1
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/releases", create_release)
    r.add_get("/v1/releases", list_releases)
    r.add_delete("/v1/releases/{version}", revoke_release)
    r.add_put("/v1/releases/{version}/files/{name}", upload_release_file)
    r.add_get("/v1/releases/{version}/files/{name}", connector_release_file)
    r.add_get("/v1/updates", connector_updates)
