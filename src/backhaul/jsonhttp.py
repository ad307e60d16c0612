"""One JSON call over an aiohttp session, shared by every client of the control API."""

from __future__ import annotations

from typing import Any, NamedTuple

import aiohttp
import orjson
from multidict import CIMultiDict

from backhaul.errors import ServiceError

class Answer(NamedTuple):
    status: int
    headers: CIMultiDict[str]
    body: Any


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    limit: int,
) -> Answer:
    """Send ``body`` as JSON and decode the JSON answer, reading at most ``limit`` bytes.

    An oversized answer is refused rather than buffered. Transport errors (aiohttp, ssl, timeouts) propagate for the caller to word for its
    user; an oversized or non-JSON answer is a ServiceError.
    """
    hdrs = {"Accept": "application/json", **(headers or {})}
    data = None
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        data = orjson.dumps(body)
    async with session.request(method, url, data=data, headers=hdrs) as resp:
        raw = await resp.content.read(limit + 1)
        status, resp_headers = resp.status, resp.headers.copy()
    if len(raw) > limit:
        raise ServiceError(f"the answer to {method} {url} is larger than {limit} bytes; is this a backhaul relay?")
    try:
        decoded = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise ServiceError(f"{method} {url} answered HTTP {status} with something that is not JSON; is this a backhaul relay?") from exc
    return Answer(status, resp_headers, decoded)
