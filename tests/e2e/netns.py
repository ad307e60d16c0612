"""Several "machines" on one host: each a network namespace with its own loopback.

A connector and its private app run inside a ``Machine``: there, 127.0.0.1 is that
machine's own, so the same target ``127.0.0.1:PORT`` is a different origin on each
machine, and stopping one machine's origin makes it unreachable from that connector
only, exactly as on two hosts. The relay stays in the host's namespace; a machine
reaches it through a pair of bridges (bridge.py) joined by a unix socket, so every
address in use is still 127.0.0.1.

Namespaces come from ``unshare --user --map-root-user --net`` (no root needed where
unprivileged user namespaces are allowed) and are entered with ``nsenter``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .harness import HERE, Proc, wait_until

UNSHARE = ["unshare", "--user", "--map-root-user", "--net"]


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(UNSHARE + ["true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"cannot create a user and network namespace here: {probe.stderr.strip()}"
    return None


def _ready(path: Path, what: str) -> None:
    wait_until(path.exists, 15, what)


class HostBridge:
    """The host side: a unix socket forwarded to 127.0.0.1:``port`` (the relay's listen port)."""

    def __init__(self, name: str, port: int, sockdir: Path, workdir: Path, procs: list[Proc]) -> None:
        self.path = sockdir / f"{name}.sock"
        ready = workdir / f"bridge-{name}.ready"
        argv = [sys.executable, str(HERE / "bridge.py"), "outer", "--unix", str(self.path), "--port", str(port), "--ready", str(ready)]
        procs.append(Proc(f"bridge-{name}", argv, workdir))
        _ready(ready, f"the host bridge {name}")


class Machine:
    """A network namespace whose 127.0.0.1:``port`` leads to ``bridge`` (the relay)."""

    def __init__(self, name: str, bridge: HostBridge, port: int, workdir: Path, procs: list[Proc]) -> None:
        self.name = name
        self.workdir = workdir
        self.procs = procs
        ready = workdir / f"machine-{name}.ready"
        argv = UNSHARE + [
            sys.executable, str(HERE / "bridge.py"), "inner", "--port", str(port), "--unix", str(bridge.path), "--ready", str(ready),
        ]
        self.holder = Proc(f"machine-{name}", argv, workdir)
        procs.append(self.holder)
        _ready(ready, f"machine {name}'s namespace and bridge")

    def run(self, name: str, argv: list[str], env: dict | None = None) -> Proc:
        """Start ``argv`` inside this machine's namespace."""
        enter = ["nsenter", "--target", str(self.holder.pid), "--user", "--net", "--preserve-credentials", "--"]
        proc = Proc(f"{self.name}-{name}-{len(self.procs)}", enter + argv, self.workdir, env)
        self.procs.append(proc)
        return proc

    def backend(self, mode: str, port: int, greeting: str) -> Proc:
        """A backend (backend.py) listening on this machine's 127.0.0.1:``port``."""
        portfile = self.workdir / f"{self.name}-backend-{len(self.procs)}.port"
        proc = self.run("backend", [sys.executable, str(HERE / "backend.py"), mode, str(portfile), "--port", str(port), "--name", greeting])
        wait_until(lambda: portfile.exists() or not proc.alive(), 15, f"machine {self.name}'s backend to listen")
        assert proc.alive(), f"backend on machine {self.name} exited:\n{proc.log()[-2000:]}"
        return proc
