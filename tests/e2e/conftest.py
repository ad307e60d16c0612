import resource

import pytest

from .harness import Backend, running_relay


@pytest.fixture(autouse=True, scope="session")
def _raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def system(tmp_path):
    """An initialized relay (running) with no connectors yet; everything stopped at the end."""
    with running_relay(tmp_path) as system_:
        yield system_


@pytest.fixture
def backend(tmp_path):
    """backend(mode, *args) -> Backend; every backend process is stopped at the end."""
    procs = []

    def start(mode: str, *args: str) -> Backend:
        return Backend(mode, tmp_path, procs, args)

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()
