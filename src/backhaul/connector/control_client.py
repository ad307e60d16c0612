"""What the connector agent asks the control API: config, heartbeat, certificate renewal.

Every call rides an aiohttp session whose TLS context carries the connector's client
certificate (see ``connector_session``). After a renewal the caller builds a new
session so the new certificate is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import functools
import os
import ssl
from typing import Any

import aiohttp
from multidict import CIMultiDict

from backhaul import pki, tlsconfig
from backhaul.connector.state import ConnectorState, replace_credentials
from backhaul.transport import proxy_connect
from backhaul.transport.proxy_connect import Proxy
from backhaul.jsonhttp import request_json
from backhaul.errors import CertificateError, ServiceError

#: Error codes with which the control API says this connector no longer exists: an admin
#: deleted it (or it was removed after long absence). Nothing else means that: a network
#: error, a 5xx, a replaced certificate or a refusal by a proxy is never taken for it.
DELETED_CODES = frozenset({"unknown_connector", "connector_revoked"})


class ConnectorDeleted(CertificateError):
    """The relay answered that this connector is unknown or revoked: only re-registering helps."""


#: Seconds one control call may take, connection included.
REQUEST_TIMEOUT = 30.0
#: Largest answer read from the control API.
MAX_RESPONSE = 4 * 1024 * 1024


def connector_session(
    state: ConnectorState, *, timeout: float = REQUEST_TIMEOUT, proxy: Proxy | None = None
) -> aiohttp.ClientSession:
    """An aiohttp session to the service, authenticated by the connector's certificate
    (through ``proxy`` when given: TLS runs end to end inside its CONNECT)."""
    ctx = tlsconfig.connector_context(state, tlsconfig.ALPN_HTTP)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=4),
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"Accept": "application/json"},
        **proxy_connect.aiohttp_options(proxy),
    )


async def _call(
    state: ConnectorState,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    base: str | None = None,
) -> tuple[int, CIMultiDict[str], Any]:
    base = base or state.service_url
    url = base + path
    try:
        status, resp_headers, decoded = await request_json(session, method, url, body, headers, limit=MAX_RESPONSE)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise CertificateError(f"the service at {base} did not present a certificate from the service CA ({exc.certificate_error})") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as exc:
        where = base.removeprefix("https://") if base != state.service_url else f"{state.host}:{state.port}"
        at_proxy = proxy_connect.from_aiohttp(exc, where)
        if at_proxy is not None:
            raise at_proxy from exc
        raise ServiceError(f"{method} {url} failed ({exc.__class__.__name__}: {exc}); will retry") from exc
    if status >= 400:
        detail = decoded.get("detail") if isinstance(decoded, dict) else f"HTTP {status}"
        if status == 403:
            if isinstance(decoded, dict) and decoded.get("error") in DELETED_CODES:
                raise ConnectorDeleted(f"the service refused this connector: {detail}")
            raise CertificateError(f"the service refused this connector: {detail}")
        raise ServiceError(f"{method} {path} failed: {detail}")
    return status, resp_headers, decoded


async def pull_config(
    state: ConnectorState, session: aiohttp.ClientSession, etag: str | None, base: str | None = None
) -> tuple[str | None, dict[str, Any] | None]:
    """The connector's config: (etag, config), or (etag, None) when unchanged since ``etag``.

    ``base``, here and below: another node's https://HOST:PORT instead of the enrolled service URL."""
    headers = {"If-None-Match": f'"{etag}"'} if etag else {}
    status, resp_headers, config = await _call(state, session, "GET", "/v1/connector/config", headers=headers, base=base)
    new_etag = resp_headers.get("ETag", "").strip('"') or etag
    if status == 304:
        return new_etag, None
    if not isinstance(config, dict) or not isinstance(config.get("apps"), list):
        raise ServiceError("the service's config answer has no apps list")
    return new_etag, config


async def heartbeat(
    state: ConnectorState, session: aiohttp.ClientSession, stats: dict[str, Any], base: str | None = None
) -> dict[str, Any]:
    """Report {version, cpu, memory, streams, bytes_in, bytes_out, apps (origin health)};
    returns the service's answer (its ``config_version`` tells whether a config pull is worth doing)."""
    _, _, answer = await _call(state, session, "POST", "/v1/connector/heartbeat", stats, base=base)
    return answer


async def renew(state: ConnectorState, session: aiohttp.ClientSession, base: str | None = None) -> ConnectorState:
    """Get a certificate for a fresh key, put both in place atomically; returns the new state."""
    key = pki.generate_key()
    csr = pki.make_csr(key, state.name)
    _, _, answer = await _call(
        state, session, "POST", "/v1/connector/renew", {"csr": pki.csr_to_pem(csr).decode("ascii")}, base=base
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("certificate"), str):
        raise ServiceError("the service's renewal answer has no certificate")
    cert = pki.load_cert(answer["certificate"])
    pki.verify_issued_by(cert, pki.load_cert_file(state.ca_path))
    if pki.connector_id_of(cert) != state.connector_id or not pki.same_public_key(key, cert):
        raise CertificateError("the renewed certificate is not for this connector's new key; keeping the current one")
    await asyncio.get_running_loop().run_in_executor(
        None, replace_credentials, state.state_dir, pki.cert_to_pem(cert), pki.key_to_pem(key)
    )
    return ConnectorState.load(state.state_dir)


#: Lock file in the state dir that serializes renewals of several connector workers.
RENEW_LOCK = ".renew.lock"


@contextlib.contextmanager
def _renew_lock(state: ConnectorState):
    fd = os.open(state.state_dir / RENEW_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def renew_if_due(
    state: ConnectorState, session: aiohttp.ClientSession, now: datetime.datetime | None = None, base: str | None = None
) -> ConnectorState:
    """Renew once two thirds of the certificate's lifetime have passed; safe to call from
    every worker process at once (one renews, the others pick up its result).

    Returns the current state: the caller rebuilds its sessions and TLS contexts when
    ``cert_serial`` changed.
    """
    if not state.renewal_due(now):
        return state
    loop = asyncio.get_running_loop()
    lock = _renew_lock(state)
    await loop.run_in_executor(None, lock.__enter__)
    try:
        current = await loop.run_in_executor(None, functools.partial(ConnectorState.load, state.state_dir, now=now))
        if current.cert_serial != state.cert_serial or not current.renewal_due(now):
            return current
        return await renew(current, session, base)
    finally:
        lock.__exit__(None, None, None)
