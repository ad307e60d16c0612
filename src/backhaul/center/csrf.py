"""Where a change may come from: the same origin as the admin center, never another site.

The CSRF token (sessions.check_csrf) is the real check; these headers, which a browser sets
and a page cannot forge, refuse a cross-site request before it reaches it. A client that
sends neither (curl with a cookie) still needs the token.
"""

from __future__ import annotations

from typing import Mapping
from urllib.parse import urlsplit

from backhaul.center.sessions import Refused

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_origin(headers: Mapping[str, str], host: str) -> None:
    """Refused(403) when the browser says the request comes from another site or origin."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        raise Refused(403, "cross_site_refused", f"a {site} request may not change anything; use the admin center's own page")
    origin = headers.get("Origin")
    # Under "Referrer-Policy: no-referrer" Chromium sends "Origin: null" with the page's own
    # form posts; its Sec-Fetch-Site (checked above) still says same-origin, so that will do.
    if origin == "null" and site == "same-origin":
        return
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme != "https" or parts.netloc.lower() != host.lower():
            raise Refused(403, "cross_site_refused", f"a request from origin {origin[:100]!r} may not change anything here")
