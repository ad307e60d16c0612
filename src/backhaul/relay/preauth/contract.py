"""The contract between the HTTP edge and pre-authentication.

The edge parses a request head, finds the app by Host and, for an app published with
``--preauth oidc``, asks a :class:`Gate` before anything reaches a connector. The gate
answers :class:`Allow` (with the identity headers the backend gets) or :class:`Respond`
(a login redirect, a 401, the login callback's own answer). No gate, no entry: an oidc
app on a relay without a configured issuer is refused, never passed through.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

#: Request headers with this prefix are the relay's to set: the edge drops any a client
#: sends, so a user cannot forge the identity the backend trusts.
IDENTITY_HEADER_PREFIX = "x-backhaul-"
#: Cookies with this prefix are the relay's own (sign-in session, login state): the edge
#: takes them out of the Cookie header, so no backend (or its access log) ever holds a
#: credential for the edge.
RELAY_COOKIE_PREFIX = "backhaul_"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    """One parsed request as the user sent it to the edge."""

    method: str
    #: The request-target as sent: path and query.
    target: str
    #: Header names lower-cased, in arrival order, repeated names kept.
    headers: tuple[tuple[str, str], ...]
    #: How the user reached the edge: "http" or "https".
    scheme: str
    #: The external host the request is for, without a port.
    host: str
    #: The user's IP address.
    client: str

    def header(self, name: str) -> str | None:
        """The first value of a header, by lower-case name."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through to the backend."""

    #: Who the user is (for the session log), when known.
    user: str | None = None
    #: Added to the request the backend gets (names lower-case, prefixed IDENTITY_HEADER_PREFIX).
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Respond:
    """Answer the user from the edge; the request goes no further."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


class Gate(Protocol):
    """Pre-authentication of requests to oidc apps."""

    async def check(self, app, request: RequestHead) -> Allow | Respond:
        """Decide about one request to ``app`` (a store App with preauth "oidc")."""
        ...
