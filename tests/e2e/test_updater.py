"""The updater end to end: real wheels of this project, real venvs, a real relay and connector.

The releases (tests/e2e/releases.py) are built once per session and cached by source hash.
What runs here: the first install from a wheelhouse (`updater install`, a subprocess), the
refusals of tampered, wrongly signed and expired wheelhouses and of a second updater on
one root, and an update and a rollback of a supervised connector serving a real app
(in-process Updater with the connector as its child; the release comes from a signed local
wheelhouse, so this does not need the relay's release endpoints).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from backhaul.config import UpdaterLimits
from backhaul.release import keys as release_keys
from backhaul.updater.layout import Layout
from backhaul.updater.runner import Updater
from backhaul.updater.service import SupervisedConnector

from .harness import BACKHAUL, Backend, echoes, running_relay, wait_until
from .releases import build_release, release_env, sign_wheelhouse

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.codec_independent]

V1, V2, BROKEN = "1.0.1", "1.0.2", "1.0.3"
#: The connector's entry, made to fail at once: a release that cannot start.
CANNOT_START = {
    "src/backhaul/connector/service.py": (
        '    """Run the connector\'s workers until SIGTERM; SIGHUP reloads the settings."""\n',
        '    """Run the connector\'s workers until SIGTERM; SIGHUP reloads the settings."""\n'
        "    raise SystemExit(3)  # a release that cannot start (tests/e2e/test_updater.py)\n",
    )
}
TIMINGS: dict[str, float] = {}
#: Connectors of the group in the rollout test (the closing note measures 5 too).
GROUP = 2


@pytest.fixture(scope="session")
def releases():
    started = time.monotonic()
    built = {v: build_release(v) for v in (V1, V2)}
    built[BROKEN] = build_release(BROKEN, patch=CANNOT_START)
    TIMINGS["build releases"] = time.monotonic() - started
    print(f"\nreleases built (or taken from the cache) in {TIMINGS['build releases']:.1f} s", file=sys.stderr)
    return built


def _updater(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        BACKHAUL + ["updater", *args], capture_output=True, text=True, timeout=timeout, env=release_env(), stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise AssertionError(f"updater {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
    return done


def _venv_version(root: Path) -> str:
    return subprocess.run(
        [str(root / "current" / "venv" / "bin" / "python"), "-c", "import backhaul; print(backhaul.__version__)"],
        capture_output=True, text=True, check=True, env=release_env(PYTHONPATH=""),
    ).stdout.strip()



class LongTransfers:
    """``streams`` threads, each making long echo transfers back to back until stopped.

    A transfer sends ``size`` random bytes paced over about ``seconds`` and reads the echo at
    the same time; it is intact only when the sha256 of what came back is the sha256 of what
    was sent. Paced so that some are in flight whenever a connector switches and drains.
    Bounded: at most ``max_each`` transfers per thread, each with a socket timeout.
    """

    CHUNK = 64 * 1024

    def __init__(self, port: int, streams: int = 3, size: int = 4 * 1024 * 1024, seconds: float = 5.0, max_each: int = 20) -> None:
        import threading

        self.port, self.size, self.max_each = port, size, max_each
        self.pause = seconds / (size / self.CHUNK)
        # The threads start staggered, so their transfers do not all end at once: whenever a
        # connector switches, one of them has more than half a transfer to go.
        self.stagger = seconds / streams
        self.done: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(i * self.stagger,), name=f"long-transfer-{i}", daemon=True) for i in range(streams)
        ]

    def start(self) -> "LongTransfers":
        for thread in self._threads:
            thread.start()
        return self

    def stop_and_join(self, timeout: float = 60) -> list[dict]:
        """No new transfers; wait for the ones in flight to end."""
        self._stop.set()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "a long transfer did not end"
        return self.done

    def _loop(self, delay: float) -> None:
        if self._stop.wait(delay):
            return
        for _ in range(self.max_each):
            if self._stop.is_set():
                return
            result = self._transfer()
            with self._lock:
                self.done.append(result)

    def _transfer(self) -> dict:
        import hashlib
        import socket
        import threading

        payload = os.urandom(self.size)
        result = {"started": time.time(), "ended": None, "ok": False, "error": None, "echoed": 0}
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=20) as sock:
                send_error: list[BaseException] = []

                def send() -> None:
                    try:
                        for offset in range(0, self.size, self.CHUNK):
                            sock.sendall(payload[offset:offset + self.CHUNK])
                            time.sleep(self.pause)
                    except OSError as exc:
                        send_error.append(exc)

                sender = threading.Thread(target=send, daemon=True)
                sender.start()
                got = hashlib.sha256()
                echoed = 0
                while echoed < self.size:
                    chunk = sock.recv(262144)
                    if not chunk:
                        break
                    got.update(chunk)
                    echoed += len(chunk)
                sender.join(20)
                result["echoed"] = echoed
                result["ok"] = not send_error and echoed == self.size and got.digest() == hashlib.sha256(payload).digest()
                if not result["ok"]:
                    result["error"] = f"echoed {echoed} of {self.size} bytes" + (f"; send: {send_error[0]}" if send_error else "")
        except OSError as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["ended"] = time.time()
        return result


def test_first_install_then_refusals_leave_nothing_installed(tmp_path, releases):
    root = tmp_path / "root"
    started = time.monotonic()
    done = _updater("install", "--install-root", str(root), "--wheelhouse", str(releases[V1].wheelhouse), "--no-systemd")
    TIMINGS["first install"] = time.monotonic() - started
    assert f"installed {V1}" in done.stdout
    assert os.readlink(root / "current") == f"versions/{V1}"
    assert _venv_version(root) == V1
    assert subprocess.run([str(root / "current/venv/bin/backhaul"), "--help"], capture_output=True, env=release_env(PYTHONPATH="")).returncode == 0
    assert (root / "logs" / "updater.log").read_text().count('"installed"') >= 1
    again = _updater("install", "--install-root", str(root), "--wheelhouse", str(releases[V1].wheelhouse), "--no-systemd")
    assert again.returncode == 0 and os.readlink(root / "current") == f"versions/{V1}"

    # The installed updater itself (its venv has no pip, as every venv here) installs the next
    # release: the pip it uses is the one CPython bundles (updater.install.pip_command).
    done = subprocess.run(
        [str(root / "current/venv/bin/backhaul"), "updater", "install", "--install-root", str(tmp_path / "root-next"),
         "--wheelhouse", str(releases[V2].wheelhouse), "--no-systemd"],
        capture_output=True, text=True, timeout=300, env=release_env(PYTHONPATH=""),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _venv_version(tmp_path / "root-next") == V2

    # With a pinned key, the wheelhouse's signed manifest is checked; each refusal installs nothing.
    state = tmp_path / "state"
    key = Ed25519PrivateKey.generate()
    release_keys.pin(state, key.public_key())
    signed = sign_wheelhouse(releases[V1], key, tmp_path / "signed")
    tampered = tmp_path / "tampered"
    shutil.copytree(signed, tampered)
    victim = next(p for p in tampered.glob("*.whl") if not p.name.startswith("backhaul-"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    wrong_key = sign_wheelhouse(releases[V1], Ed25519PrivateKey.generate(), tmp_path / "wrong-key")
    expired = sign_wheelhouse(releases[V1], key, tmp_path / "expired", issued=time.time() - 7200, expires_in=3600)
    for wheelhouse, reason in ((tampered, "bad_hash"), (wrong_key, "unknown_key"), (expired, "expired")):
        other = tmp_path / f"root-{reason}"
        done = _updater("install", "--install-root", str(other), "--wheelhouse", str(wheelhouse), "--state-dir", str(state), "--no-systemd", check=False)
        assert done.returncode != 0 and reason in done.stderr, (reason, done.stderr)
        assert not (other / "current").exists() and list((other / "versions").iterdir()) == []

    # A second updater on a root that one holds is refused, naming the holder.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from backhaul.updater.layout import RootLock;"
         "RootLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(root)],
        stdout=subprocess.PIPE, text=True, env=release_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _updater("install", "--install-root", str(root), "--wheelhouse", str(signed), "--state-dir", str(state), "--no-systemd", check=False)
        assert done.returncode != 0 and f"pid {holder.pid}" in done.stderr
    finally:
        holder.kill()
        holder.wait(5)
    print(f"\nfirst install (venv + pip + self-test): {TIMINGS['first install']:.1f} s", file=sys.stderr)


def test_supervised_connector_updates_and_a_release_that_cannot_start_is_rolled_back(tmp_path, releases, monkeypatch):
    # The supervised connector runs a test release, built without the Cython extension.
    monkeypatch.setenv("BACKHAUL_REQUIRE_EXT", "0")
    root = tmp_path / "root"
    _updater("install", "--install-root", str(root), "--wheelhouse", str(releases[V1].wheelhouse), "--no-systemd")
    key = Ed25519PrivateKey.generate()
    procs: list = []
    with running_relay(tmp_path) as system:
        backend = Backend("echo", tmp_path, procs)
        state = system.register("c1")
        release_keys.pin(state, key.public_key())
        config = tmp_path / "connector.toml"
        config.write_text("workers = 1\ntunnels = 2\nheartbeat_interval = 1\ndrain_timeout = 5\n")
        port = system.publish_tcp("echo", backend.target)
        layout = Layout(root)
        limits = UpdaterLimits(ready_deadline=40, stable_period=3, status_interval=0.5, stop_timeout=20)
        connector = SupervisedConnector(layout.backhaul(), state, config=config, stop_timeout=limits.stop_timeout, restart_delay=0.5)
        updater = Updater(layout, state, limits, connector)
        try:
            connector.start()
            system.wait_app(port)
            first_pid = connector.proc.pid

            # A replay of the installed version: refused, the connector never stopped.
            outcome = asyncio.run(updater.apply_wheelhouse(sign_wheelhouse(releases[V1], key, tmp_path / "v1"), force=True))
            assert (outcome.step, outcome.reason) == ("refused", "not_newer")
            assert connector.proc.pid == first_pid and echoes(port)

            started = time.monotonic()
            outcome = asyncio.run(updater.apply_wheelhouse(sign_wheelhouse(releases[V2], key, tmp_path / "v2"), force=True))
            TIMINGS["update (install, switch, drain, gate)"] = time.monotonic() - started
            assert outcome.step == "healthy", outcome
            assert layout.current_version() == V2 and _venv_version(root) == V2
            assert connector.proc.pid != first_pid
            system.wait_app(port)
            wait_until(lambda: system.connector_info("c1").get("version") == V2, 15, "the relay to list c1 at the new version", interval=0.2)

            # An updater that died during the gate: the next start judges the switch it left.
            layout.record(layout.load_state(), V2, "switched", "as if the updater died during the health gate")
            outcome = asyncio.run(updater.resume())
            assert outcome is not None and outcome.step == "healthy", outcome
            assert asyncio.run(updater.resume()) is None  # judged now: nothing left to judge

            started = time.monotonic()
            outcome = asyncio.run(updater.apply_wheelhouse(sign_wheelhouse(releases[BROKEN], key, tmp_path / "broken"), force=True))
            TIMINGS["rollback of a release that cannot start"] = time.monotonic() - started
            assert outcome.step == "rolled_back" and "crash loop" in outcome.reason, outcome
            assert layout.current_version() == V2
            saved = layout.load_state()
            assert saved.active == V2 and BROKEN in saved.failed
            assert [h["step"] for h in saved.history if h["version"] == BROKEN][-1] == "rolled_back"
            system.wait_app(port)  # the previous version serves again
            assert not layout.version_dir(BROKEN).exists() and layout.installed_versions() == [V1, V2]
        finally:
            connector.stop()
            for proc in procs:
                proc.stop()
    print("\n" + "\n".join(f"{what}: {seconds:.1f} s" for what, seconds in TIMINGS.items()), file=sys.stderr)


def _lease_endpoints() -> bool:
    """The relay's update leases (the rollout part of issue 11) are in this tree."""
    import backhaul.store.base as store_base

    return hasattr(store_base, "UpdateLease")


def _steps(log: Path, step: str) -> list[dict]:
    import json

    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == f"update {step}":
            out.append(entry)
    return out


@pytest.mark.skipif(not _lease_endpoints(), reason="needs the relay's update lease endpoints (rollout branch)")
def test_a_group_updates_one_connector_at_a_time_through_the_relay_and_a_broken_release_halts_it(tmp_path, releases):
    from .harness import EchoLoad, Proc

    env = release_env()
    key_priv, key_pub = tmp_path / "release.key", tmp_path / "release.pub"
    procs: list = []
    with running_relay(tmp_path) as system:
        system.cli("release", "keygen", "--private", str(key_priv), "--public", str(key_pub))
        backend = Backend("echo", tmp_path, procs)
        port = system.publish_tcp("echo", backend.target)
        config = tmp_path / "connector.toml"
        # The drain deadline is well above a long transfer (5 s), so a drain never needs to cut one.
        config.write_text("workers = 1\ntunnels = 2\nheartbeat_interval = 1\ndrain_timeout = 15\n")
        roots, updaters = {}, {}
        try:
            for name in [f"c{i + 1}" for i in range(GROUP)]:
                state = tmp_path / f"conn-{name}"
                system.cli(
                    "connector", "register", "--service", system.url, "--token", system.token(), "--ca-sha256", system.ca_sha256,
                    "--state-dir", str(state), "--name", name, "--release-key", str(key_pub),
                )
                roots[name] = tmp_path / f"root-{name}"
                _updater("install", "--install-root", str(roots[name]), "--wheelhouse", str(releases[V1].wheelhouse), "--no-systemd")
                updaters[name] = Proc(
                    f"updater-{name}",
                    BACKHAUL + ["updater", "run", "--state-dir", str(state), "--install-root", str(roots[name]), "--supervise",
                                "--check-interval", "1", "--connector-config", str(config),
                                "--limit", "stable_period=3", "--limit", "status_interval=0.5", "--limit", "stop_timeout=30"],
                    tmp_path, env,
                )
                procs.append(updaters[name])
            for name in roots:
                system.wait_tunnels(name, 2)
            system.wait_app(port)

            started = time.monotonic()
            # New connections all through the rollout (about 25 s here), each a fresh stream.
            load = EchoLoad(port, clients=4, seconds=30, max_each=100000).start()
            # And long transfers (4 MiB each over about 5 s), back to back, so some span each switch.
            transfers = LongTransfers(port, streams=3).start()
            system.admin("release", "publish", *map(str, releases[V2].files), "--signing-key", str(key_priv), "--auto")
            wait_until(
                lambda: all(os.readlink(r / "current") == f"versions/{V2}" for r in roots.values())
                and all(system.connector_info(n).get("version") == V2 for n in roots),
                180, "both connectors on the new version", interval=0.5,
            )
            TIMINGS[f"publish to a group of {GROUP} on the new version"] = time.monotonic() - started
            wait_until(
                lambda: all(_steps(r / "logs" / "updater.log", "healthy") for r in roots.values()), 60,
                "both updaters to find their new version healthy", interval=0.5,
            )
            # Never both at once: each connector's [switched, healthy] interval is apart from the other's.
            spans = sorted(
                (_steps(roots[n] / "logs" / "updater.log", "switched")[-1]["ts"], _steps(roots[n] / "logs" / "updater.log", "healthy")[-1]["ts"])
                for n in roots
            )
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
            # 0 transfers cut: every long transfer came back whole, some were in flight at each switch,
            # and each old connector's drain ended its streams in flight without cutting one.
            done = transfers.stop_and_join(timeout=60)
            broken = [t for t in done if not t["ok"]]
            assert done and not broken, f"{len(broken)} of {len(done)} long transfers were cut: {broken[:3]}"
            for name, root in roots.items():
                switched = _steps(root / "logs" / "updater.log", "switched")[-1]["ts"]
                assert any(t["started"] < switched < t["ended"] - 1 for t in done), (name, switched, done)
            drained = [e for proc in updaters.values() for e in proc.log_entries("connector worker drained")]
            assert len(drained) >= GROUP and not any(e["streams_cut"] for e in drained), drained
            assert sum(e["streams_in_flight"] for e in drained) > 0, drained
            TIMINGS["long transfers during the rollout (none cut)"] = len(done)
            TIMINGS["streams in flight at the old connectors' drains"] = sum(e["streams_in_flight"] for e in drained)
            attempts = load.join(timeout=90)
            failed = [a for a in attempts if not a.ok]
            TIMINGS["new connections during the rollout"] = len(attempts)
            assert attempts and not failed, f"{len(failed)} of {len(attempts)} new connections failed: {failed[:3]}"

            # A release that cannot start: rolled back where it was tried, the rollout halts, the other never tries.
            system.admin("release", "publish", *map(str, releases[BROKEN].files), "--signing-key", str(key_priv), "--auto")
            wait_until(
                lambda: any(_steps(r / "logs" / "updater.log", "rolled_back") for r in roots.values()), 120,
                "the broken release to be rolled back", interval=0.5,
            )
            assert all(os.readlink(r / "current") == f"versions/{V2}" for r in roots.values())
            system.wait_app(port)
            tried = [n for n, r in roots.items() if _steps(r / "logs" / "updater.log", "rolled_back")]
            assert len(tried) == 1
            status = system.admin_json("rollout", "status")
            assert "halted" in str(status) and BROKEN in str(status), status
            # release list: per group, who is on which version, what was rolled back and why it halted.
            listed = {r["version"]: r["groups"] for r in system.admin_json("release", "list")}
            assert listed[V2]["default"] == {"connectors": GROUP, "on": GROUP, "updating": None, "failed": 0, "rolled_back": 0, "halted": None}
            broken = listed[BROKEN]["default"]
            assert (broken["on"], broken["rolled_back"], broken["updating"]) == (0, 1, None) and broken["halted"], broken
            human = system.admin("release", "list").stdout
            assert f"default: {GROUP}/{GROUP} on it" in human and f"default: 0/{GROUP} on it, rolled back 1, halted" in human, human
            assert f"release {BROKEN} halted group default: {broken['halted']}" in human, human
            for proc in updaters.values():
                assert proc.alive(), proc.log()[-3000:]
        finally:
            for proc in reversed(procs):
                proc.stop(timeout=40)
    print("\n" + "\n".join(f"{what}: {value:.1f}" for what, value in TIMINGS.items()), file=sys.stderr)


def test_releases_from_the_relay_that_must_not_be_installed_leave_the_connector_serving(tmp_path, releases):
    """Through the relay: a wheel altered in the relay's store, a replay of an older signed
    release, a release signed by a key that is not pinned, a revoked release."""
    import sqlite3

    from .harness import Proc

    key_priv, key_pub = tmp_path / "release.key", tmp_path / "release.pub"
    other_priv, other_pub = tmp_path / "other.key", tmp_path / "other.pub"
    procs: list = []
    with running_relay(tmp_path) as system:
        try:
            system.cli("release", "keygen", "--private", str(key_priv), "--public", str(key_pub))
            system.cli("release", "keygen", "--private", str(other_priv), "--public", str(other_pub))
            backend = Backend("echo", tmp_path, procs)
            port = system.publish_tcp("echo", backend.target)
            state = tmp_path / "conn-c1"
            system.cli(
                "connector", "register", "--service", system.url, "--token", system.token(), "--ca-sha256", system.ca_sha256,
                "--state-dir", str(state), "--name", "c1", "--release-key", str(key_pub),
            )
            root = tmp_path / "root"
            _updater("install", "--install-root", str(root), "--wheelhouse", str(releases[V1].wheelhouse), "--no-systemd")
            connector = Proc("connector-c1", [str(root / "current/venv/bin/backhaul"), "connector", "run", "--state-dir", str(state),
                                              "--workers", "1", "--tunnels", "2"], tmp_path, release_env(PYTHONPATH=""))
            procs.append(connector)
            system.wait_app(port)
            system.admin("release", "publish", *map(str, releases[V1].files), "--signing-key", str(key_priv))
            system.admin("release", "publish", *map(str, releases[V2].files), "--signing-key", str(key_priv), "--auto")
            system.admin("release", "publish", *map(str, releases[BROKEN].files), "--signing-key", str(other_priv), "--auto")
            # Someone with write access to the relay's store alters a stored wheel of 1.0.2.
            with sqlite3.connect(system.data_dir / "store.sqlite") as db:
                (name,) = db.execute("SELECT name FROM release_files WHERE version = ? AND name LIKE 'backhaul-%'", (V2,)).fetchone()
                db.execute("UPDATE release_chunks SET data = zeroblob(length(data)) WHERE version = ? AND name = ? AND seq = 0", (V2, name))

            apply = ["apply", "--state-dir", str(state), "--install-root", str(root)]
            for extra, words in (
                (["--version", V2], "bad_hash"),      # altered in the store: the signed sha256 does not match
                (["--version", V1], "not_newer"),     # a replay of an older signed release
                (["--version", BROKEN], "unknown_key"),  # signed, but not by the pinned key
            ):
                done = _updater(*apply, *extra, check=False)
                assert done.returncode != 0 and words in done.stdout + done.stderr, (extra, done.stdout, done.stderr)
                assert os.readlink(root / "current") == f"versions/{V1}"
                assert root.joinpath("versions").exists() and sorted(p.name for p in (root / "versions").iterdir()) == [V1]
                assert connector.alive() and echoes(port)
            system.admin("release", "revoke", V2)
            done = _updater(*apply, "--version", V2, check=False)
            assert done.returncode != 0 and "revoked" in done.stderr, done.stderr
            history = [h["reason"].split(":")[0] for h in Layout(root).load_state().history if h["step"] == "refused"]
            assert history == ["bad_hash", "not_newer", "unknown_key"]
            assert not list((root / "downloads").iterdir())  # the altered download was removed
            assert connector.alive() and echoes(port)
        finally:
            for proc in reversed(procs):
                proc.stop()
