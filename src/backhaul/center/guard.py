"""Whether a request with an admin-center session cookie may go ahead: the one rule that
the control API (control/web.py require_admin) and the pages both apply.

Pure: the caller reads the store's key, the signed-out list, the admin token's hash and the clock.
"""

from __future__ import annotations

from typing import Mapping

from backhaul.center import csrf, sessions
from backhaul.center.sessions import Refused, Session


def authorize(
    state: tuple[str, dict[str, float]],
    admin_token_hash: str | None,
    cookie: str,
    method: str,
    headers: Mapping[str, str],
    host: str,
    now: float,
    form_csrf: str | None = None,
) -> tuple[Session, bytes]:
    """The session and its key, or Refused. A safe method needs the cookie only; any other
    also a same-origin request (csrf.check_origin) carrying the session's CSRF token in the
    X-CSRF-Token header (or, for the page's own plain forms, ``form_csrf``)."""
    if admin_token_hash is None:
        raise Refused(401, "unauthorized", "the relay has no admin token; run `backhaul service init`")
    key = sessions.mac_key(state[0], admin_token_hash)
    session = sessions.verify(key, cookie, now, state[1])
    if method.upper() not in csrf.SAFE_METHODS:
        csrf.check_origin(headers, host)
        sessions.check_csrf(key, session, headers.get(sessions.CSRF_HEADER) or form_csrf)
    return session, key
