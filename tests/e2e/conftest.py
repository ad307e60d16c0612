import resource

import pytest

from .harness import Backend, System


@pytest.fixture(autouse=True, scope="session")
def _raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def system(tmp_path):
    """An initialized relay (running) with no connectors yet; everything stopped at the end."""
    sys_ = System(tmp_path)
    try:
        sys_.init()
        sys_.start_relay()
        yield sys_
    finally:
        sys_.stop()


@pytest.fixture
def backend(tmp_path):
    """backend(mode) -> Backend; every backend process is stopped at the end."""
    procs = []

    def start(mode: str) -> Backend:
        return Backend(mode, tmp_path, procs)

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()
