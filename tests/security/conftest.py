"""Hostile-input tests: each case of docs/security.md against real processes on 127.0.0.1.

They use the end-to-end harness and its fixtures (a running relay, backends), so a
hostile test reads like the e2e test of the feature it attacks.
"""

from tests.e2e.conftest import _raise_fd_limit, backend, system  # noqa: F401  (fixtures)
