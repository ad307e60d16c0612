"""`backhaul demo`, driven as a user would: the real process, what it prints, the printed
commands run as pasted in a new shell (no `backhaul` on the PATH), one connector killed
by the printed PID while the apps stay up, Ctrl-C, and the logs where it said."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

#: Seconds the demo may take to come up on a loaded 2-core machine.
START_TIMEOUT = 90.0
#: Seconds one pasted command may take.
COMMAND_TIMEOUT = 30.0


class DemoRun:
    """The `backhaul demo` process and the lines it printed, read by a thread as they come."""

    def __init__(self, workdir: Path) -> None:
        self.stderr = open(workdir.parent / "demo.stderr", "w+b")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "backhaul", "demo", "--dir", str(workdir)],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, text=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.children: list[int] = []

    def _read(self) -> None:
        for line in self.popen.stdout:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def expect(self, pattern: str, timeout: float) -> re.Match:
        """The first line from now on matching ``pattern``; fails after ``timeout`` or at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        self.stderr.seek(0)
        raise AssertionError(
            f"the demo printed no line matching {pattern!r}:\n" + "\n".join(self.lines)
            + "\nstderr:\n" + self.stderr.read().decode(errors="replace")[-3000:]
        )

    def remember_children(self) -> None:
        path = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        self.children = [int(pid) for pid in path.read_text().split()]

    def close(self) -> None:
        """Stop the demo (it stops its children); whatever is left of them is killed."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in self.children:  # each child leads its own process group (its workers too)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.stderr.close()


def new_shell_env() -> dict[str, str]:
    """The environment of a new shell: PATH without the venv (so `backhaul` is not on it)."""
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not os.access(os.path.join(d, "backhaul"), os.X_OK)
    )
    assert shutil.which("backhaul", path=path) is None
    return {**os.environ, "PATH": path}


def paste(line: str, env: dict[str, str]) -> str:
    """Run one printed line as a user pasting it into bash; its output (it must succeed)."""
    result = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"{line}\nfailed ({result.returncode}): {result.stderr.strip()}"
    return result.stdout


README = Path(__file__).parents[2] / "README.md"


def readme_admin_examples_work(data_dir: Path, listen: str, backhaul: str, env: dict[str, str], cwd: Path) -> None:
    """Every `backhaul admin --data-dir svc ...` line of the README works against the demo's
    relay with the demo's data dir for `svc`: the data dir says where its relay listens."""
    lines = [line.partition("  #")[0].strip() for line in README.read_text().splitlines()]
    examples = [line for line in lines if line.startswith("backhaul admin --data-dir svc ")]
    assert len(examples) >= 3, examples
    if not (data_dir / "relay.json").exists():  # until the data dir records its relay (relay.json)
        env = {**env, "BACKHAUL_SERVICE": listen}
    for line in examples:
        pasted = line.replace("backhaul", backhaul, 1).replace(" svc ", f" {data_dir} ", 1)
        result = subprocess.run(["bash", "-c", pasted], capture_output=True, text=True, env=env, cwd=cwd, timeout=COMMAND_TIMEOUT)
        assert result.returncode == 0, f"README: {line}\nfailed: {result.stderr.strip()}"
    assert (cwd / "token.txt").read_text().strip()  # `token create > token.txt` printed the token


def test_the_printed_commands_work_as_pasted_and_the_apps_outlive_one_connector(tmp_path):
    workdir = tmp_path / "demo"
    demo = DemoRun(workdir)
    try:
        demo.expect(r"^Running\. Ctrl-C stops everything; the logs stay in ", START_TIMEOUT)
        demo.remember_children()
        out = "\n".join(demo.lines)
        assert len(re.findall(r"^  .* \.\.\. .*\(\d+\.\d s\)$", out, re.M)) == 4, out  # four short progress lines
        logs = Path(re.search(r"^  logs +(\S+)$", out, re.M).group(1))
        data_dir = Path(re.search(r"^  data dir +(\S+)$", out, re.M).group(1))
        listen = re.search(r"^  relay +(https://127\.0\.0\.1:\d+) ", out, re.M).group(1)
        assert re.search(rf"^  admin page +{re.escape(listen)}/admin/ .*{re.escape(str(data_dir / 'admin.token'))}", out, re.M)
        assert (data_dir / "admin.token").is_file()
        commands = out.partition("Try these; each works as pasted in a new shell:\n")[2].partition("\n\n")[0].splitlines()
        tcp, http, udp = (next(c for c in commands if c.endswith(f"# {kind} app {name}") or f"# {kind} app {name}," in c)
                          for kind, name in (("TCP", "hello-tcp"), ("HTTP", "hello-web"), ("UDP", "hello-udp")))
        admin_list = next(c for c in commands if c.endswith(" connector list"))
        app_list = next(c for c in commands if c.endswith(" app list"))
        version = next(c for c in commands if c.endswith(" --version"))
        admin_page = next(c for c in commands if c.endswith("# the admin page"))
        assert f" {listen}/admin/ " in admin_page
        kill = re.search(r"^  (kill (\d+)) +# connector (demo-b)$", out, re.M)
        assert kill, out

        env = new_shell_env()

        def apps_answer() -> None:
            assert "Hello from the private app" in paste(tcp, env)
            assert "Host: hello.demo.internal" in paste(http, env)  # routed by host name through the HTTP edge
            assert paste(udp, env).strip() == "private udp app got: hello"

        apps_answer()
        listing = paste(admin_list, env)
        for name in ("demo-a", "demo-b"):
            assert re.search(rf"\b{name}\s+default\s+active\b", listing), listing
        paste(admin_page, env)  # the relay's certificate verifies against the CA the line names
        apps = paste(app_list, env)
        for name in ("hello-tcp", "hello-web", "hello-udp"):
            assert re.search(rf"^{name}\s", apps, re.M), apps
        assert re.fullmatch(r"backhaul \S+\n", paste(version, env))
        readme_admin_examples_work(data_dir, listen, version.removesuffix(" --version").strip(), env, tmp_path)

        # Kill demo-b by the printed PID: the demo says so, and every app answers through demo-a.
        paste(kill.group(1), env)
        demo.expect(rf"^connector demo-b \(pid {kill.group(2)}\) stopped .*the apps keep answering through demo-a$", 30)
        for _ in range(3):
            apps_answer()
        assert re.search(r"\bdemo-a\s+default\s+active\b", paste(admin_list, env))

        # Ctrl-C: everything stops, and the logs are where the demo said.
        demo.popen.send_signal(signal.SIGINT)
        demo.expect(rf"^demo stopped; its logs are in {re.escape(str(logs))}$", 60)
        assert demo.popen.wait(30) == 0
        for pid in demo.children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
        for name in ("app", "relay", "demo-a", "demo-b"):
            assert (logs / f"{name}.log").stat().st_size > 0, name
        assert "connector worker drained" in (logs / "demo-b.log").read_text()
        assert (logs / "demo-a" / "admin.log").stat().st_size > 0
    finally:
        demo.close()


def test_the_demo_refuses_a_work_dir_that_is_not_empty(tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "backhaul", "demo", "--dir", str(tmp_path), "--seconds", "0"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "is not empty" in result.stderr
    assert (tmp_path / "taken").read_text() == "mine"
