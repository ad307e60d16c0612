"""The admin API client: where the service is, how to trust it, and one call to it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from backhaul import tlsconfig
from backhaul.jsonhttp import request_json
from backhaul.errors import CertificateError, ConfigError, ServiceError

DEFAULT_SERVICE = "https://127.0.0.1:8443"
#: Seconds an admin call may take, connection included.
REQUEST_TIMEOUT = 30.0
#: Largest answer read from the service.
MAX_RESPONSE = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class AdminTarget:
    """The service to administer, the admin token, and the CA it must present."""

    service_url: str
    token: str
    ca: bytes | Path
    #: where the URL came from ("--service", "BACKHAUL_SERVICE", the relay.json path, "the default"),
    #: said when a call cannot connect
    service_source: str = "--service"


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"admin token file {path} is missing; pass --token-file or --data-dir of the service") from None
    except OSError as exc:
        raise ConfigError(f"cannot read admin token file {path}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"admin token file {path} is empty")
    return token


def resolve_target(
    *,
    service: str | None,
    token_file: str | None,
    data_dir: str | None,
    ca_file: str | None = None,
    environ: os._Environ | dict[str, str] = os.environ,
) -> AdminTarget:
    """Service URL: --service, then BACKHAUL_SERVICE, then --data-dir's relay.json (where its
    relay listens), then the default. Token: the flag, then BACKHAUL_TOKEN, then --data-dir.
    The CA: --ca, then BACKHAUL_CA (a path), then --data-dir/ca.pem."""
    url, source = _service_url(service, data_dir, environ)
    if not url.startswith("https://"):
        raise ConfigError(f"the service URL {url!r} must start with https://, e.g. {DEFAULT_SERVICE}")
    if token_file:
        token = _read_token(Path(token_file))
    elif environ.get("BACKHAUL_TOKEN"):
        token = environ["BACKHAUL_TOKEN"].strip()
    elif data_dir:
        token = _read_token(Path(data_dir) / "admin.token")
    else:
        raise ConfigError("no admin token: pass --token-file FILE or --data-dir DIR, or set BACKHAUL_TOKEN")
    ca_path = ca_file or environ.get("BACKHAUL_CA") or (str(Path(data_dir) / "ca.pem") if data_dir else None)
    if not ca_path:
        raise ConfigError("no service CA to trust: pass --data-dir DIR or --ca FILE, or set BACKHAUL_CA to the service's ca.pem")
    if not Path(ca_path).is_file():
        raise ConfigError(f"the service CA {ca_path} is missing; pass the service's ca.pem")
    return AdminTarget(service_url=url.rstrip("/"), token=token, ca=Path(ca_path), service_source=source)


def _service_url(service: str | None, data_dir: str | None, environ) -> tuple[str, str]:
    """(the URL, where it came from), in the order of precedence of ``resolve_target``."""
    if service:
        return service, "--service"
    if environ.get("BACKHAUL_SERVICE"):
        return environ["BACKHAUL_SERVICE"], "BACKHAUL_SERVICE"
    if data_dir:
        from backhaul.relayfile import RELAY_FILE, read_service_url

        recorded = read_service_url(Path(data_dir))
        if recorded:
            return recorded, str(Path(data_dir) / RELAY_FILE)
    return DEFAULT_SERVICE, "the default"


async def request(target: AdminTarget, method: str, path: str, body: Any = None) -> Any:
    """One admin API call (async); the decoded JSON answer, or ServiceError with the API's detail."""
    ctx = tlsconfig.admin_context(target.ca)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as session:
            status, _, decoded = await request_json(
                session, method, target.service_url + path, body, {"Authorization": f"Bearer {target.token}"}, limit=MAX_RESPONSE
            )
    except aiohttp.ClientConnectorCertificateError as exc:
        raise CertificateError(
            f"the service at {target.service_url} did not present a certificate from the expected CA ({exc.certificate_error}); "
            "check --service and the CA file"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise ServiceError(
            f"cannot reach the service at {target.service_url} (from {target.service_source}: {exc.strerror or exc}); "
            "check --service and that `backhaul service run` is up"
        ) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as exc:
        raise ServiceError(f"the request to {target.service_url} failed ({exc.__class__.__name__}: {exc}); try again") from exc
    if status >= 400:
        if isinstance(decoded, dict) and "detail" in decoded:
            raise ServiceError(f"{decoded['detail']} ({decoded.get('error', status)})")
        raise ServiceError(f"the service answered HTTP {status}")
    return decoded


def call(target: AdminTarget, method: str, path: str, body: Any = None) -> Any:
    """One admin API call; the decoded JSON answer, or ServiceError with the API's detail."""
    return asyncio.run(request(target, method, path, body))
