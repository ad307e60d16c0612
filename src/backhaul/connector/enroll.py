"""`backhaul connector register`: enroll this machine with a token and a pinned CA.

The service's CA is fetched over an unverified connection and compared with the
pinned SHA-256 before anything secret is sent; the token then travels over a second
connection whose only trust anchor is that CA (and whose host name is checked). The
private key is made here and never leaves the machine: the service signs a CSR.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from backhaul import __version__, pki, tlsconfig
from backhaul.config import LogFiles
from backhaul.connector.state import LOG_DIR, STATE_FILE, parse_service_url, write_state
from backhaul.jsonhttp import request_json
from backhaul.transport import proxy_connect
from backhaul.transport.proxy_connect import Proxy
from backhaul.errors import CertificateError, ConfigError, EnrollmentError, ServiceError
from backhaul.files import read_bounded
from backhaul.logs import add_admin_log
from backhaul.release import keys as release_keys
from backhaul.release.manifest import key_id

log = logging.getLogger("backhaul.connector.enroll")

#: Seconds one registration request may take, connection included.
REQUEST_TIMEOUT = 30.0
#: Largest answer read from the service during registration.
MAX_RESPONSE = 256 * 1024
#: Environment variable `connector register` reads the enrollment token from.
TOKEN_ENV = "BACKHAUL_ENROLL_TOKEN"
#: Longest enrollment token file read (a token is about 50 bytes).
MAX_TOKEN_FILE = 4096


def enrollment_token(token: str | None, token_file: str | None, environ: dict[str, str] | os._Environ) -> str:
    """The token from exactly one of --token, --token-file and BACKHAUL_ENROLL_TOKEN;
    ConfigError, in words, when none or several are given or the file is unusable."""
    env = environ.get(TOKEN_ENV)
    given = [name for name, value in (("--token", token), ("--token-file", token_file), (TOKEN_ENV, env)) if value is not None]
    if len(given) != 1:
        which = " and ".join(given) if given else "none of them"
        raise ConfigError(
            f"give the enrollment token exactly one way: --token-file FILE, {TOKEN_ENV}, or --token TOKEN "
            f"(visible to other users in the process list); got {which}"
        )
    if token_file is not None:
        raw = read_bounded(token_file, MAX_TOKEN_FILE, "--token-file", "it should hold only the token")
        try:
            value = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"--token-file {token_file} is not text; it should hold only the token") from None
        source = f"--token-file {token_file}"
    else:
        value = (token if token is not None else env or "").strip()
        source = given[0]
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"the enrollment token from {source} is empty or has spaces in it; paste the one line `backhaul admin token create` printed")
    return value


async def _request(
    ctx: ssl.SSLContext, method: str, url: str, body: Any = None, proxy: Proxy | None = None
) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout, **proxy_connect.aiohttp_options(proxy)
        ) as session:
            status, _, decoded = await request_json(session, method, url, body, limit=MAX_RESPONSE)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise CertificateError(
            f"the service's TLS certificate does not match the pinned CA or the host name in {url} "
            f"({exc.certificate_error}); use a --service name the service certificate was made for"
        ) from exc
    except (aiohttp.ClientHttpProxyError, aiohttp.ClientProxyConnectionError, aiohttp.ServerDisconnectedError) as exc:
        service = yarl.URL(url)
        at_proxy = proxy_connect.from_aiohttp(exc, f"{service.host}:{service.port}", proxy)
        if at_proxy is None:
            raise ServiceError(f"the request to {url} failed ({exc.__class__.__name__}: {exc}); try again") from exc
        raise at_proxy from exc
    except aiohttp.ClientConnectorError as exc:
        raise ServiceError(f"cannot reach the service at {url} ({exc.strerror or exc}); check --service and the network") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as exc:
        raise ServiceError(f"the request to {url} failed ({exc.__class__.__name__}: {exc}); try again") from exc
    return status, decoded


async def fetch_pinned_ca(service_url: str, pin: str, proxy: Proxy | None = None) -> bytes:
    """The service CA (PEM), after checking its SHA-256 against ``pin``."""
    status, data = await _request(tlsconfig.pinning_probe_context(), "GET", f"{service_url}/v1/ca", proxy=proxy)
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("ca"), str):
        raise ServiceError(f"{service_url}/v1/ca answered HTTP {status} without a CA; is this a backhaul relay?")
    ca_pem = data["ca"].encode("ascii", errors="replace")
    actual = pki.fingerprint_sha256(ca_pem)
    if not hmac.compare_digest(actual, pin):
        raise CertificateError(
            f"the service's CA has SHA-256 {actual}, not the pinned {pin}; "
            "check --ca-sha256 against `backhaul service init` output (or this is not your service)"
        )
    return ca_pem


async def enroll(service_url: str, pin: str, token: str, name: str, proxy: Proxy | None = None) -> dict[str, Any]:
    """Enroll (through ``proxy`` when given); returns connector_id, group and the PEMs of CA,
    certificate and key."""
    ca_pem = await fetch_pinned_ca(service_url, pin, proxy)
    key = pki.generate_key()
    csr = pki.make_csr(key, name)
    status, data = await _request(
        tlsconfig.enroll_context(ca_pem),
        "POST",
        f"{service_url}/v1/enroll",
        {
            "token": token,
            "csr": pki.csr_to_pem(csr).decode("ascii"),
            "name": name,
            "hostname": socket.gethostname(),
            "version": __version__,
        },
        proxy=proxy,
    )
    if status >= 400:
        detail = data.get("detail") if isinstance(data, dict) else None
        raise EnrollmentError(f"the service refused the registration: {detail or f'HTTP {status}'}")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("connector_id", "certificate", "group")):
        raise ServiceError("the service's enrollment answer lacks connector_id, certificate or group")
    cert = pki.load_cert(data["certificate"])
    pki.verify_issued_by(cert, pki.load_cert(ca_pem))
    if pki.connector_id_of(cert) != data["connector_id"] or not pki.same_public_key(key, cert):
        raise CertificateError("the certificate the service returned is not for this connector's key and id; try again")
    return {
        "connector_id": data["connector_id"],
        "group": data["group"],
        "ca_pem": ca_pem,
        "cert_pem": pki.cert_to_pem(cert),
        "key_pem": pki.key_to_pem(key),
    }


def register(args: argparse.Namespace) -> int:
    """Handler of `backhaul connector register`."""
    state_dir = Path(args.state_dir).absolute()
    if (state_dir / STATE_FILE).exists():
        raise ConfigError(f"{state_dir} already holds a registered connector; use another --state-dir, or delete it first")
    service_url = args.service.rstrip("/")
    host, _ = parse_service_url(service_url)
    proxy = proxy_connect.choose_proxy(args.proxy, host)
    pin = pki.normalize_fingerprint(args.ca_sha256)
    token = enrollment_token(args.token, args.token_file, os.environ)
    name = args.name or socket.gethostname()
    # Read before enrolling: a wrong key file must not cost the (single-use) token.
    pinned = [release_keys.load_public(Path(path)) for path in getattr(args, "release_key", [])]
    result = asyncio.run(enroll(service_url, pin, token, name, proxy))
    # Before connector.json, which marks the registration complete: a registered connector has its keys.
    for key in pinned:
        release_keys.pin(state_dir, key)
    write_state(
        state_dir,
        service_url=service_url,
        connector_id=result["connector_id"],
        name=name,
        ca_pem=result["ca_pem"],
        cert_pem=result["cert_pem"],
        key_pem=result["key_pem"],
    )
    add_admin_log(LogFiles(directory=state_dir / LOG_DIR))
    log.info(
        "connector registered",
        extra={
            "connector_id": result["connector_id"], "connector_name": name, "group": result["group"], "service": service_url,
            "release_keys": [release_keys.key_id(k) for k in pinned],
        },
    )
    print(f"registered connector {result['connector_id']} ({name}) in group {result['group']}; state in {state_dir}")
    if pinned:
        print(f"release keys pinned: {', '.join(key_id(k) for k in pinned)}")
    else:
        print("no release key pinned (--release-key FILE): the updater will install nothing on this connector")
    return 0
