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
    monkeypatch.delenv("BACKHAUL_REQUIRE_EXT", raising=False)
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
