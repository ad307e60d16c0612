"""The connector's control socket on a real unix socket: owner only, one per state dir, long paths."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from backhaul.connector import control_socket
from backhaul.errors import ConfigError

pytestmark = pytest.mark.codec_independent


def _serve_and_call(sock, run_dir, calls):
    """Serve a fake status on ``sock`` and run ``calls(run_dir)`` against it in the same loop."""
    switched = []

    async def set_log(on: bool) -> dict:
        switched.append(on)
        return {"on": on, "workers": 1, "confirmed": 1, "path": "/x"}

    async def main():
        runner = await control_socket.serve(sock, lambda: {"running": True, "figures": {"tunnels": 3}}, set_log)
        try:
            return await calls(run_dir)
        finally:
            await runner.cleanup()

    return asyncio.run(main()), switched


def test_status_and_switch_over_the_socket(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = control_socket.listen(run_dir)
    path = run_dir / control_socket.SOCKET
    assert path.stat().st_mode & 0o777 == 0o600

    async def calls(run_dir):
        status = await control_socket.call(run_dir, "GET", "/v1/status")
        switched = await control_socket.call(run_dir, "PUT", "/v1/session-log", {"on": True})
        with pytest.raises(Exception, match="must be"):
            await control_socket.call(run_dir, "PUT", "/v1/session-log", {"on": "yes"})
        return status, switched

    (status, switched), flips = _serve_and_call(sock, run_dir, calls)
    assert status["figures"]["tunnels"] == 3
    assert switched["on"] is True and flips == [True], "a bad body changes nothing"


def test_a_second_connector_on_the_same_state_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    first = control_socket.listen(run_dir)
    try:
        with pytest.raises(ConfigError, match="already running"):
            control_socket.listen(run_dir)
    finally:
        first.close()
    # the first one is gone: its stale socket file is replaced, not an error
    control_socket.listen(run_dir).close()


def test_not_running_is_reported_as_such(tmp_path):
    with pytest.raises(control_socket.NotRunning):
        asyncio.run(control_socket.call(tmp_path, "GET", "/v1/status"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / control_socket.SOCKET))
    stale.close()  # bound, never listening: a socket file left by a dead connector
    with pytest.raises(control_socket.NotRunning):
        asyncio.run(control_socket.call(tmp_path, "GET", "/v1/status"))


def test_a_state_dir_too_long_for_a_socket_path_still_works(tmp_path):
    run_dir = tmp_path / ("d" * 60) / ("e" * 60) / "run"
    run_dir.mkdir(parents=True, mode=0o700)
    assert len(str(run_dir / control_socket.SOCKET)) > 108
    sock = control_socket.listen(run_dir)

    async def calls(run_dir):
        return await control_socket.call(run_dir, "GET", "/v1/status")

    status, _ = _serve_and_call(sock, run_dir, calls)
    assert status["running"] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused_by_peer_credentials():
    # The directory and socket are opened up on purpose, so only the SO_PEERCRED check stands in the way
    # (pytest's own tmp dirs are private to root, so this one lives in /tmp).
    base = Path(tempfile.mkdtemp(prefix="bh-peercred-"))
    try:
        _refuse_another_user(base)
    finally:
        shutil.rmtree(base)


def _refuse_another_user(base: Path) -> None:
    run_dir = base / "run"
    run_dir.mkdir()
    sock = control_socket.listen(run_dir)
    os.chmod(base, 0o755)
    os.chmod(run_dir, 0o755)
    os.chmod(run_dir / control_socket.SOCKET, 0o666)

    async def calls(run_dir):
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the other user: nobody
            try:
                os.close(read_fd)
                os.setgid(65534)
                os.setuid(65534)
                client = socket.socket(socket.AF_UNIX)
                client.connect(str(run_dir / control_socket.SOCKET))
                client.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
                os.write(write_fd, answer[:200])
            except BaseException as exc:
                os.write(write_fd, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        await loop.run_in_executor(None, os.waitpid, pid, 0)
        with os.fdopen(read_fd, "rb") as pipe:
            return pipe.read()

    answer, _ = _serve_and_call(sock, run_dir, calls)
    assert answer.startswith(b"HTTP/1.1 403"), answer
