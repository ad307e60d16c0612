"""The updater's calls to the relay's control API, with the connector's own credentials.

The same mutually authenticated session as the connector's config pull and heartbeat
(``backhaul.connector.control_client.connector_session``); the updater's calls differ in
that a refusal carries a reason the updater acts on (a 409 lease refusal waits for the next
check), and a release file is streamed to disk with its size bounded by the manifest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from backhaul.progress import Progress
from backhaul.connector.control_client import MAX_RESPONSE, connector_session
from backhaul.connector.state import ConnectorState
from backhaul.errors import ServiceError
from backhaul.jsonhttp import request_json
from backhaul.updater.layout import UNVERIFIED, UpdateRefused, check_file_name, check_version

#: Bytes read from the network at a time while downloading a release file.
CHUNK = 256 * 1024


class Unreachable(ServiceError):
    """The relay did not answer at all (network, TLS, timeout): never blamed on a release."""


class Refused(ServiceError):
    """The relay answered with an error; ``status`` and ``reason`` say which."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Offer:
    """A release the relay offers (not verified yet: only the signature makes it trusted)."""

    version: str
    manifest: bytes
    signature: bytes
    auto: bool
    rollout: dict


def parse_offer(answer: Any) -> Offer | None:
    """``GET /v1/updates``'s answer as an Offer (None: nothing newer); UpdateRefused if malformed."""
    if not isinstance(answer, dict) or "release" not in answer:
        raise UpdateRefused("malformed", "the relay's /v1/updates answer has no release field")
    release = answer["release"]
    if release is None:
        return None
    try:
        return Offer(
            version=check_version(release["version"]),
            manifest=base64.b64decode(release["manifest"], validate=True),
            signature=base64.b64decode(release["signature"], validate=True),
            auto=bool(release.get("auto", False)),
            rollout=answer.get("rollout") if isinstance(answer.get("rollout"), dict) else {},
        )
    except (KeyError, TypeError, binascii.Error) as exc:
        raise UpdateRefused("malformed", f"the relay's release offer is malformed ({exc.__class__.__name__}: {exc})") from None


class RelayClient:
    """One aiohttp session to the relay for the updater's calls; use as an async context manager."""

    def __init__(self, state_dir: Path, *, timeout: float = 30.0) -> None:
        self.state_dir = Path(state_dir)
        self.timeout = timeout
        self.state: ConnectorState | None = None
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "RelayClient":
        # Loaded at each use: the connector renews its certificate; the updater follows.
        self.state = ConnectorState.load(self.state_dir)
        self.session = connector_session(self.state, timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        assert self.state is not None and self.session is not None
        url = self.state.service_url + path
        try:
            answer = await request_json(self.session, method, url, body, limit=MAX_RESPONSE)
        except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError, OSError) as exc:
            raise Unreachable(f"{method} {path}: the relay at {self.state.service_url} did not answer ({exc.__class__.__name__}: {exc})") from None
        if answer.status >= 400:
            body_ = answer.body if isinstance(answer.body, dict) else {}
            reason = str(body_.get("reason") or body_.get("error") or f"http_{answer.status}")
            detail = body_.get("detail") or body_.get("error") or f"HTTP {answer.status}"
            raise Refused(answer.status, reason, f"{method} {path}: the relay refused ({answer.status}, {reason}): {detail}")
        return answer.body

    async def health(self) -> bool:
        """True when the relay's control API answers /v1/health at all (the updater's own reach)."""
        try:
            await self._json("GET", "/v1/health")
        except Unreachable:
            return False
        except Refused as exc:
            return exc.status < 500
        return True

    async def offer(self, installed: str | None, version: str | None = None) -> Offer | None:
        query = {"version": version} if version else ({"installed": installed} if installed else {})
        path = "/v1/updates" + ("?" + urllib.parse.urlencode(query) if query else "")
        return parse_offer(await self._json("GET", path))

    async def lease(self, version: str) -> dict:
        answer = await self._json("POST", "/v1/updates/lease", {"version": version})
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), int):
            raise ServiceError("the relay's lease answer has no token")
        return answer

    async def renew(self, token: int) -> dict:
        return await self._json("POST", "/v1/updates/lease/renew", {"token": token})

    async def report(self, version: str, step: str, reason: str = "", token: int | None = None) -> None:
        await self._json("POST", "/v1/updates/report", {"version": version, "step": step, "reason": reason, "token": token})

    async def download(
        self, version: str, name: str, size: int, directory: Path, stall: float, total: float,
        progress: Progress | None = None,
    ) -> Path:
        """Stream one release file to ``directory/NAME.unverified``; at most ``size`` bytes are taken.

        The caller checks it (size, sha256) and renames it; a relay sending more than the
        manifest says is cut off at once instead of filling the disk.
        """
        assert self.state is not None and self.session is not None
        check_file_name(name)
        path = directory / (name + UNVERIFIED)
        url = f"{self.state.service_url}/v1/releases/{urllib.parse.quote(check_version(version))}/files/{urllib.parse.quote(name)}"
        got = 0
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=total, sock_read=stall)) as resp:
                if resp.status != 200:
                    raise Refused(resp.status, f"http_{resp.status}", f"GET {url}: the relay answered HTTP {resp.status}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        got += len(chunk)
                        if got > size:
                            raise UpdateRefused("bad_size", f"the relay sent more than the {size} bytes the signed manifest lists for {name}")
                        os.write(fd, chunk)
                        if progress is not None:
                            progress.advance(len(chunk))
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise Unreachable(f"downloading {name} failed after {got} bytes ({exc.__class__.__name__}: {exc})") from None
        return path
