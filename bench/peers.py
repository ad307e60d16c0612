"""The servers bench/compare.py measures through: a backend (nginx + iperf3) and the paths to it.

Every server listens on 127.0.0.1 only, on a port found free by binding port 0, runs in a
temporary directory, lives in its own process group, and is stopped by ``Processes.stop_all``.
Readiness is always checked by connecting (TCP, HTTP or the SSH banner), never by sleeping
a fixed time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import peer_pki  # bench/ is on sys.path (compare.py puts it there); backhaul is imported lazily

#: The response body nginx serves for the request/response test.
BODY = b"x" * 99 + b"\n"
#: How long a server may take to become ready before the benchmark gives up on it.
READY_TIMEOUT = 30.0
#: Extra places to look for daemons (sshd lives in /usr/sbin, not on a user's PATH).
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class BenchError(Exception):
    """A server could not be started or a measurement could not be taken; the message says why."""


def find_program(name: str) -> str | None:
    """Absolute path of a program on PATH or in an sbin directory, or None."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = Path(directory, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: ask for SIGKILL if the benchmark itself is killed -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; fields follow the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_kib(pid: int) -> int:
    """Resident set size of one process in KiB (VmRSS), 0 if it is gone."""
    try:
        for line in Path("/proc", str(pid), "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (and its reaped children), 0 if it is gone."""
    try:
        fields = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3 of stat, so utime..cstime (14..17) are 11..14 here.
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime, and those of reaped children) of ``pid`` and all its living
    descendants, from /proc; 0 for a process that is gone. Threads are counted in their process."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


@dataclasses.dataclass
class Managed:
    """One started server: its process (leader of its own process group) and its log."""

    name: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's output, for error messages."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(empty log)"

    def check_alive(self) -> None:
        """Raise BenchError (with its log) if the server has exited."""
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; its log ends:\n{self.log_tail()}")

    def usage(self) -> dict:
        """Total RSS and CPU seconds of the server's process tree, and how many processes it has."""
        pids = process_tree(self.proc.pid) if self.proc.poll() is None else []
        return {
            "rss_kib": sum(rss_kib(p) for p in pids),
            "cpu_s": round(sum(cpu_seconds(p) for p in pids), 2),
            "processes": len(pids),
        }


class Processes:
    """Owns every server the benchmark starts and stops them all, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Managed] = []

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None, stdin_pipe: bool = False) -> Managed:
        """Start ``argv`` in a new session (so its own process group), output to a log file."""
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd or self.workdir,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        managed = Managed(name, proc, log)
        self.started.append(managed)
        return managed

    def stop(self, managed: Managed, timeout: float = 5.0) -> None:
        """SIGTERM the server's process group and any descendant that left it, then SIGKILL."""
        proc = managed.proc
        if proc.poll() is None:
            tree = process_tree(proc.pid)
            self._signal(proc.pid, tree, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            stragglers = [p for p in tree if Path("/proc", str(p)).exists()]
            self._signal(proc.pid, stragglers, signal.SIGKILL)
            proc.wait(timeout)
        else:
            # The leader is gone but children (nginx workers, sshd sessions) may remain.
            self._signal(proc.pid, [], signal.SIGKILL)
        if proc.stdin:
            proc.stdin.close()
        if managed in self.started:
            self.started.remove(managed)

    @staticmethod
    def _signal(pgid: int, pids: list[int], sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        # Some servers move children into sessions of their own (sshd does); reach them by pid.
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        """Stop every server still running, newest first; never raises for one that is gone."""
        errors = []
        for managed in reversed(list(self.started)):
            try:
                self.stop(managed)
            except Exception as exc:  # keep stopping the others, then report
                errors.append(f"{managed.name}: {exc}")
        if errors:
            raise BenchError("could not stop: " + "; ".join(errors))


def wait_until(what: str, probe, deadline: float, watched: list[Managed]) -> object:
    """Call ``probe`` until it returns without raising OSError/BenchError, or fail at ``deadline``."""
    last: Exception | None = None
    delay = 0.01
    while True:
        for managed in watched:
            managed.check_alive()
        try:
            return probe()
        except (OSError, BenchError, http.client.HTTPException) as exc:
            last = exc
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {m.name} log:\n{m.log_tail()}" for m in watched)
            raise BenchError(f"{what} not ready after {READY_TIMEOUT:.0f} s (last error: {last})\n{logs}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def probe_http(port: int, host: str = "127.0.0.1") -> None:
    """One GET / through host:port; raise BenchError unless it returns the benchmark body."""
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or body != BODY:
        raise BenchError(f"GET / on port {port} answered {response.status} with {len(body)} bytes")


def probe_ssh_banner(port: int) -> None:
    """Connect to an SSH server and read its version banner."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        if not sock.recv(64).startswith(b"SSH-"):
            raise BenchError(f"port {port} does not speak SSH")


@dataclasses.dataclass
class Route:
    """A way to reach the backend: ports for HTTP (nginx) and bulk (iperf3), and its processes."""

    key: str
    label: str
    http_port: int
    iperf_port: int
    #: The iperf3 server behind this path.
    iperf: "IperfServer"
    #: Role name ("relay", "connector", "haproxy", ...) -> the process whose tree is measured.
    roles: dict[str, Managed] = dataclasses.field(default_factory=dict)

    def usage(self) -> dict:
        """RSS and CPU time of each role's process tree, read from /proc now."""
        return {role: managed.usage() for role, managed in self.roles.items()}

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each role's process tree (the path's own processes:
        never the load generators or the backend)."""
        return {role: tree_cpu_seconds(managed.proc.pid) for role, managed in self.roles.items()}


class IperfServer:
    """One persistent ``iperf3 -s``. Each path has its own, so a test whose connections
    linger on one path cannot block the next path's test (iperf3 runs one test at a time)."""

    def __init__(self, procs: Processes, name: str) -> None:
        self.procs = procs
        self.name = name
        self.port = free_port()
        self.managed: Managed | None = None

    def start(self) -> None:
        """(Re)start the server on its port and wait until it completes a real test."""
        if self.managed is not None:
            self.procs.stop(self.managed)
        self.managed = self.procs.start(
            self.name, [find_program("iperf3"), "-s", "-B", "127.0.0.1", "-p", str(self.port)]
        )
        deadline = time.monotonic() + READY_TIMEOUT
        wait_until(self.name, self._probe, deadline, [self.managed])

    def _probe(self) -> None:
        # A tiny real test, not a bare connect: iperf3 counts a bare connect as an aborted
        # test, and the next client can collide with its clean-up.
        argv = [find_program("iperf3"), "-c", "127.0.0.1", "-p", str(self.port), "-n", "64K", "--connect-timeout", "2000"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{self.name}: a 64 KiB test did not finish in 10 s") from exc
        if done.returncode != 0:
            raise BenchError(f"{self.name}: {done.stderr.strip() or done.stdout.strip()[-200:]}")

    def busy_connections(self) -> int:
        """Connections the server still holds (ESTABLISHED or CLOSE_WAIT on its port)."""
        busy = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == self.port and fields[3] in ("01", "08"):
                busy += 1
        return busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the previous test's connections are gone; False if they outlast ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.busy_connections():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


class Backend:
    """nginx serving the 100-byte body; each path's iperf3 server comes from ``iperf_server``."""

    def __init__(self, procs: Processes, nginx_workers: str) -> None:
        self.procs = procs
        self.nginx_workers = nginx_workers
        self.nginx_port = free_port()

    def iperf_server(self, key: str) -> IperfServer:
        """A started iperf3 server for the path ``key``."""
        server = IperfServer(self.procs, f"iperf3-server-{key}")
        server.start()
        return server

    def start(self) -> None:
        """Start nginx and wait until it answers."""
        nginx = self._start_nginx()
        deadline = time.monotonic() + READY_TIMEOUT
        wait_until("nginx", lambda: probe_http(self.nginx_port), deadline, [nginx])

    def _start_nginx(self) -> Managed:
        root = self.procs.workdir / "nginx"
        root.mkdir()
        body = BODY.decode().replace("\n", "\\n")
        conf = root / "nginx.conf"
        conf.write_text(
            nginx_conf(
                root,
                self.nginx_workers,
                f"""server {{
        listen 127.0.0.1:{self.nginx_port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}""",
            )
        )
        nginx = find_program("nginx")
        return self.procs.start("nginx", [nginx, "-p", f"{root}/", "-c", str(conf), "-e", f"{root}/error.log"])

    def direct(self) -> Route:
        """The path straight to the backend."""
        iperf = self.iperf_server("direct")
        return Route("direct", "direct to the backend", self.nginx_port, iperf.port, iperf)


def _user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def nginx_conf(root: Path, workers: str | int, http_block: str) -> str:
    """An nginx.conf for a benchmark peer in ``root``: no access log, keep-alive without
    a request limit, temp paths inside ``root``, ``http_block`` inside ``http {}``."""
    # When started as root nginx drops its workers to "nobody", who cannot enter the
    # private temp dir; keep them as the current user instead.
    user = f"user {_user_name()};" if os.geteuid() == 0 else ""
    return f"""daemon off;
master_process on;
worker_processes {workers};
{user}
pid {root}/nginx.pid;
error_log {root}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    {http_block}
}}
"""


def start_haproxy(procs: Processes, backend: Backend) -> Route:
    """haproxy in TCP mode, one thread, one frontend per backend port."""
    root = procs.workdir / "haproxy"
    root.mkdir()
    http_port, iperf_port = free_port(), free_port()
    iperf = backend.iperf_server("haproxy")
    conf = root / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread 1
    # Low enough for any file-descriptor limit; the benchmark opens fewer than 100 connections.
    maxconn 2000

defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m

frontend http_in
    bind 127.0.0.1:{http_port}
    default_backend http_out
backend http_out
    server nginx 127.0.0.1:{backend.nginx_port}

frontend iperf_in
    bind 127.0.0.1:{iperf_port}
    default_backend iperf_out
backend iperf_out
    server iperf3 127.0.0.1:{iperf.port}
"""
    )
    haproxy = procs.start("haproxy", [find_program("haproxy"), "-db", "-f", str(conf)], cwd=root)
    deadline = time.monotonic() + READY_TIMEOUT
    wait_until("haproxy", lambda: probe_http(http_port), deadline, [haproxy])
    return Route("haproxy", "haproxy, mode tcp (one hop, no TLS)", http_port, iperf_port, iperf, {"haproxy": haproxy})


def start_ssh_tunnel(procs: Processes, backend: Backend) -> Route:
    """An sshd of our own on loopback and an ``ssh -R`` client forwarding both backend ports.

    The user side is sshd's forwarded listener (the "relay"); the ssh client is the
    "connector". ``-tt`` with a remote command allocates a tty, which makes both ends set
    TCP_NODELAY on the SSH connection (without it the tunnel stalls on Nagle).
    """
    root = procs.workdir / "ssh"
    root.mkdir(mode=0o700)
    keygen = find_program("ssh-keygen")
    for key in ("host_key", "user_key"):
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "backhaul-bench", "-f", str(root / key)],
            check=True,
            capture_output=True,
        )
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    sshd_port, http_port, iperf_port = free_port(), free_port(), free_port()
    iperf = backend.iperf_server("ssh")
    (root / "known_hosts").write_text(f"[127.0.0.1]:{sshd_port} {(root / 'host_key.pub').read_text()}")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        # sshd run as root insists on its privilege-separation directory, which the
        # openssh-server package normally creates at boot (tmpfiles.d).
        Path("/run/sshd").mkdir(mode=0o755)
    conf = root / "sshd_config"
    conf.write_text(
        f"""ListenAddress 127.0.0.1:{sshd_port}
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding remote
GatewayPorts no
X11Forwarding no
PermitTTY yes
PermitUserRC no
PrintMotd no
PrintLastLog no
UseDNS no
Ciphers aes128-gcm@openssh.com
Compression no
LogLevel ERROR
"""
    )
    sshd = procs.start("sshd", [find_program("sshd"), "-D", "-e", "-f", str(conf)], cwd=root)
    deadline = time.monotonic() + READY_TIMEOUT
    wait_until("sshd", lambda: probe_ssh_banner(sshd_port), deadline, [sshd])
    client = procs.start(
        "ssh-client",
        [
            find_program("ssh"),
            "-F", "/dev/null",
            "-tt",
            "-i", str(root / "user_key"),
            "-p", str(sshd_port),
            "-l", _user_name(),
            "-c", "aes128-gcm@openssh.com",
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={root}/known_hosts",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "Compression=no",
            "-o", "ControlMaster=no",
            "-o", "ForwardAgent=no",
            "-o", "ForwardX11=no",
            "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR",
            "-R", f"127.0.0.1:{http_port}:127.0.0.1:{backend.nginx_port}",
            "-R", f"127.0.0.1:{iperf_port}:127.0.0.1:{iperf.port}",
            "127.0.0.1",
            "sleep 2147483647",
        ],
        cwd=root,
        # A tty session with stdin held open: EOF on stdin would end the remote command.
        stdin_pipe=True,
    )
    wait_until("ssh -R tunnel", lambda: probe_http(http_port), deadline, [sshd, client])
    return Route(
        "ssh",
        "OpenSSH ssh -R aes128-gcm, TCP_NODELAY (-tt)",
        http_port,
        iperf_port,
        iperf,
        {"sshd": sshd, "ssh": client},
    )


def _run_cli(argv: list[str], what: str, timeout: float = 60.0) -> str:
    """Run one backhaul command to completion; its stdout, or BenchError with its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: `{' '.join(argv)}` did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or "(no output)").splitlines()[-1]
        raise BenchError(f"{what}: `{' '.join(argv)}` exited with {done.returncode}: {reason}")
    return done.stdout


def _json_of(text: str, what: str) -> dict:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BenchError(f"{what}: expected JSON, got {text[:200]!r}") from exc


def probe_health(port: int, cafile: Path) -> None:
    """GET /v1/health of the relay's control API over TLS, verified against the service CA."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=3, context=context)
    try:
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise BenchError(f"/v1/health answered {response.status}")


def start_backhaul(procs: Processes, backend: Backend, backhaul: str, workers: int) -> Route:
    """backhaul's full path, set up exactly as a user would through the CLI.

    user -> relay TCP app port -> TLS tunnel -> connector -> backend.
    """
    if not (os.path.isfile(backhaul) and os.access(backhaul, os.X_OK)):
        raise BenchError(f"{backhaul} is not an executable; run tools/bootstrap.sh or pass --backhaul PATH")
    root = procs.workdir / f"backhaul-w{workers}"
    root.mkdir()
    svc, conn = root / "svc", root / "conn"
    listen_port, http_port, iperf_port = free_port(), free_port(), free_port()
    iperf = backend.iperf_server(f"backhaul-w{workers}")
    service_url = f"https://127.0.0.1:{listen_port}"
    init = _json_of(
        _run_cli(
            [backhaul, "service", "init", "--data-dir", str(svc), "--name", "127.0.0.1", "--json"],
            "service init",
        ),
        "service init",
    )
    if "ca_sha256" not in init:
        raise BenchError(f"service init --json printed no ca_sha256: {init}")
    relay = procs.start(
        f"backhaul-relay-w{workers}",
        [
            backhaul, "service", "run",
            "--data-dir", str(svc),
            "--listen", f"127.0.0.1:{listen_port}",
            "--workers", str(workers),
        ],
        cwd=root,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    wait_until("backhaul relay /v1/health", lambda: probe_health(listen_port, svc / "ca.pem"), deadline, [relay])
    admin = [backhaul, "admin", "--service", service_url, "--data-dir", str(svc), "--json"]
    token = _json_of(_run_cli(admin + ["token", "create"], "token create"), "token create").get("token")
    if not token:
        raise BenchError("token create --json printed no token")
    _run_cli(
        [
            backhaul, "connector", "register",
            "--service", service_url,
            "--token", token,
            "--ca-sha256", init["ca_sha256"],
            "--state-dir", str(conn),
            "--name", f"bench-w{workers}",
        ],
        "connector register",
    )
    for app, port, target in (
        ("bench-nginx", http_port, backend.nginx_port),
        ("bench-iperf3", iperf_port, iperf.port),
    ):
        _run_cli(
            admin + ["app", "publish", app, "--group", "default", "--tcp", str(port), "--target", f"127.0.0.1:{target}"],
            f"app publish {app}",
        )
    connector = procs.start(
        f"backhaul-connector-w{workers}",
        [backhaul, "connector", "run", "--state-dir", str(conn), "--workers", str(workers)],
        cwd=root,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    # With several relay workers the kernel spreads user connections over them, and each
    # worker relays only through its own tunnels: require a run of fresh connections to work.
    wait_until(
        "backhaul app bench-nginx",
        lambda: [probe_http(http_port) for _ in range(8 * workers)],
        deadline,
        [relay, connector],
    )
    return Route(
        f"backhaul-w{workers}",
        f"backhaul full path, {workers} worker{'s' if workers > 1 else ''}",
        http_port,
        iperf_port,
        iperf,
        {"relay": relay, "connector": connector},
    )


def tls_files(root: Path, backhaul: str) -> dict[str, Path]:
    """Our own CA, a server and a client certificate in ``root`` (bench/peer_pki.py).

    In this interpreter when it can import backhaul and cryptography, otherwise with the
    Python of the virtualenv that holds ``backhaul`` (compare.py itself needs neither)."""
    try:
        return peer_pki.write_pki(root)
    except ImportError:
        pass
    python = Path(backhaul).parent / "python"
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise BenchError(
            f"making the peers' certificates needs backhaul and cryptography: this Python cannot import them "
            f"and there is no {python}; run tools/bootstrap.sh or pass --backhaul PATH"
        )
    _run_cli([str(python), str(Path(peer_pki.__file__)), str(root)], "peer certificates")
    return {key: root / name for key, name in peer_pki.FILES.items()}


#: The "domain" a v2ray bridge and portal recognise each other's reverse connections by
#: (never resolved: routing rules match it).
V2RAY_REVERSE_DOMAIN = "reverse.bench"
#: A fixed VLESS user id: the benchmark's portal listens on loopback only.
V2RAY_USER_ID = "5783a3e7-e373-51cd-8642-c83782b807c5"


def v2ray_portal_config(tunnel_port: int, forwards: dict[int, int], tls: dict[str, Path]) -> dict:
    """The portal (the relay side): a VLESS-over-TLS inbound the bridge dials into, and a
    dokodemo-door inbound per user port whose traffic goes back through the bridge's
    reverse (mux) connections to ``127.0.0.1:forwards[port]`` as the bridge sees it."""
    user_tags = [f"user-{port}" for port in forwards]
    return {
        # No access log: a line per connection is not what is measured.
        "log": {"access": "none", "loglevel": "warning"},
        "reverse": {"portals": [{"tag": "portal", "domain": V2RAY_REVERSE_DOMAIN}]},
        "inbounds": [
            {
                "tag": "tunnel",
                "listen": "127.0.0.1",
                "port": tunnel_port,
                "protocol": "vless",
                "settings": {"clients": [{"id": V2RAY_USER_ID}], "decryption": "none"},
                "streamSettings": {
                    "network": "tcp",
                    "security": "tls",
                    "tlsSettings": {
                        "certificates": [
                            {"certificateFile": str(tls["server_cert"]), "keyFile": str(tls["server_key"])}
                        ]
                    },
                },
            }
        ]
        + [
            {
                "tag": tag,
                "listen": "127.0.0.1",
                "port": port,
                "protocol": "dokodemo-door",
                "settings": {"address": "127.0.0.1", "port": target, "network": "tcp"},
            }
            for tag, (port, target) in zip(user_tags, forwards.items())
        ],
        # Only the reverse portal carries traffic; anything unmatched is dropped.
        "outbounds": [{"tag": "drop", "protocol": "blackhole"}],
        "routing": {
            "rules": [
                {"type": "field", "inboundTag": user_tags, "outboundTag": "portal"},
                {"type": "field", "inboundTag": ["tunnel"], "domain": [f"full:{V2RAY_REVERSE_DOMAIN}"], "outboundTag": "portal"},
            ]
        },
    }


def v2ray_bridge_config(tunnel_port: int, tls: dict[str, Path]) -> dict:
    """The bridge (the connector side): dials out to the portal over VLESS + TLS (verified
    against our CA) for its reverse connections, and opens what arrives on them with freedom."""
    return {
        # No access log: a line per connection is not what is measured.
        "log": {"access": "none", "loglevel": "warning"},
        "reverse": {"bridges": [{"tag": "bridge", "domain": V2RAY_REVERSE_DOMAIN}]},
        "outbounds": [
            {"tag": "backend", "protocol": "freedom", "settings": {}},
            {
                "tag": "tunnel",
                "protocol": "vless",
                "settings": {
                    "vnext": [
                        {
                            "address": "127.0.0.1",
                            "port": tunnel_port,
                            "users": [{"id": V2RAY_USER_ID, "encryption": "none"}],
                        }
                    ]
                },
                "streamSettings": {
                    "network": "tcp",
                    "security": "tls",
                    "tlsSettings": {
                        "serverName": peer_pki.SERVER_NAME,
                        "disableSystemRoot": True,
                        "certificates": [{"usage": "verify", "certificateFile": str(tls["ca"])}],
                    },
                },
            },
        ],
        "routing": {
            "rules": [
                {"type": "field", "inboundTag": ["bridge"], "domain": [f"full:{V2RAY_REVERSE_DOMAIN}"], "outboundTag": "tunnel"},
                {"type": "field", "inboundTag": ["bridge"], "outboundTag": "backend"},
            ]
        },
    }


def start_v2ray(procs: Processes, backend: Backend, backhaul: str) -> Route:
    """v2ray's reverse proxy: the bridge (inside, beside the backend) dials out to the
    portal over VLESS + TLS and holds mux connections; users reach the portal's ports."""
    v2ray = find_program("v2ray")
    if v2ray is None:
        raise BenchError("v2ray is not installed; tools/bench-deps.sh installs Debian's v2ray package")
    root = procs.workdir / "v2ray"
    root.mkdir()
    tls = tls_files(root, backhaul)
    tunnel_port, http_port, iperf_port = free_port(), free_port(), free_port()
    iperf = backend.iperf_server("v2ray")
    configs = {
        "portal": v2ray_portal_config(tunnel_port, {http_port: backend.nginx_port, iperf_port: iperf.port}, tls),
        "bridge": v2ray_bridge_config(tunnel_port, tls),
    }
    for role, config in configs.items():
        (root / f"{role}.json").write_text(json.dumps(config, indent=2))
    started = {}
    deadline = time.monotonic() + READY_TIMEOUT
    # The portal first: the bridge dials it as soon as it starts.
    started["portal"] = procs.start("v2ray-portal", [v2ray, "-config", str(root / "portal.json")], cwd=root)
    wait_until(
        "v2ray portal",
        lambda: socket.create_connection(("127.0.0.1", tunnel_port), 2).close(),
        deadline,
        [started["portal"]],
    )
    started["bridge"] = procs.start("v2ray-bridge", [v2ray, "-config", str(root / "bridge.json")], cwd=root)
    wait_until("v2ray reverse tunnel", lambda: probe_http(http_port), deadline, list(started.values()))
    return Route(
        "v2ray",
        "v2ray reverse (bridge -> portal), VLESS + TLS, mux",
        http_port,
        iperf_port,
        iperf,
        {"portal": started["portal"], "bridge": started["bridge"]},
    )


#: stunnel's TLS 1.3 suite here: the one backhaul's relay prefers (issue 14), so the
#: comparison is of the programs, not of the ciphers.
STUNNEL_CIPHERSUITES = "TLS_AES_128_GCM_SHA256"


def stunnel_conf(side: str, services: dict[str, tuple[int, int]], tls: dict[str, Path]) -> str:
    """An stunnel.conf for one side of the mutual-TLS pair.

    ``side`` "client": accepts users in the clear and connects over TLS with the client
    certificate, checking the server's against our CA and name; "server": accepts TLS,
    requires a client certificate from our CA, connects to the backend in the clear.
    ``services``: name -> (accept port, connect port), all on 127.0.0.1.
    """
    if side not in ("client", "server"):
        raise ValueError(f"stunnel side must be 'client' or 'server', not {side!r}")

    cert, key = (tls["client_cert"], tls["client_key"]) if side == "client" else (tls["server_cert"], tls["server_key"])
    lines = [
        "foreground = yes",
        "syslog = no",
        # Empty: no pid file (the benchmark holds the process).
        "pid =",
        "debug = warning",
        "",
    ]
    for name, (accept, connect) in services.items():
        lines += [
            f"[{name}]",
            f"client = {'yes' if side == 'client' else 'no'}",
            f"accept = 127.0.0.1:{accept}",
            f"connect = 127.0.0.1:{connect}",
            f"cert = {cert}",
            f"key = {key}",
            f"CAfile = {tls['ca']}",
            "verifyChain = yes",
            "sslVersionMin = TLSv1.3",
            f"ciphersuites = {STUNNEL_CIPHERSUITES}",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
        ]
        if side == "client":
            lines.append(f"checkHost = {peer_pki.SERVER_NAME}")
        else:
            lines.append("requireCert = yes")
        lines.append("")
    return "\n".join(lines)


def start_stunnel(procs: Processes, backend: Backend, backhaul: str) -> Route:
    """An stunnel mutual-TLS pair: users -> client-side stunnel -> TLS with a client
    certificate -> server-side stunnel -> backend. One TLS connection per user connection."""
    stunnel = find_program("stunnel4") or find_program("stunnel")
    if stunnel is None:
        raise BenchError("stunnel is not installed; tools/bench-deps.sh installs Debian's stunnel4 package")
    root = procs.workdir / "stunnel"
    root.mkdir()
    tls = tls_files(root, backhaul)
    http_port, iperf_port, tls_http, tls_iperf = free_port(), free_port(), free_port(), free_port()
    iperf = backend.iperf_server("stunnel")
    sides = {
        "server": {"http": (tls_http, backend.nginx_port), "iperf3": (tls_iperf, iperf.port)},
        "client": {"http": (http_port, tls_http), "iperf3": (iperf_port, tls_iperf)},
    }
    started = {}
    for side, services in sides.items():
        conf = root / f"stunnel-{side}.conf"
        conf.write_text(stunnel_conf(side, services, tls))
        started[side] = procs.start(f"stunnel-{side}", [stunnel, str(conf)], cwd=root)
    deadline = time.monotonic() + READY_TIMEOUT
    wait_until("stunnel pair", lambda: probe_http(http_port), deadline, list(started.values()))
    return Route(
        "stunnel",
        f"stunnel mutual-TLS pair, {STUNNEL_CIPHERSUITES}, TLS per connection",
        http_port,
        iperf_port,
        iperf,
        {"stunnel-client": started["client"], "stunnel-server": started["server"]},
    )
