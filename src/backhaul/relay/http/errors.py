"""The HTTP edge's refusal: one exception class for both builds of the message readers.

It lives outside the readers' source (``_reader_py.py``, compiled by Cython as
``_reader_c``) so that the pure twin and the compiled build raise the very same class,
whichever of them ``backhaul.relay.http.reader`` picked.
"""

from __future__ import annotations


class HttpError(Exception):
    """A message the edge refuses; ``status`` is the answer (4xx for users, 502 for backends)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
