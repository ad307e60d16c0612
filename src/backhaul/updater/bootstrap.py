"""`updater install`: the first install on a VM, from a local wheelhouse, and the systemd units.

Before the first install no key may be pinned yet, so nothing can be verified: the wheelhouse
is installed as the admin handed it over (said in the log). When the state dir does pin keys
and the wheelhouse carries a signed manifest (``release.manifest``: the manifest's bytes as
signed, ``release.sig``: the raw Ed25519 signature), it is verified like any update, and only
the files it lists are installed. `updater apply --wheelhouse DIR` takes the same layout.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import subprocess
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from backhaul.config import UpdaterLimits
from backhaul.errors import ConfigError
from backhaul.release import keys as release_keys
from backhaul.release.manifest import ReleaseRefused, check_file, verify
from backhaul.updater.install import Wheel, install_version
from backhaul.updater.layout import Layout, RootLock, UpdateRefused
from backhaul.updater.service import CONNECTOR_UNIT, UPDATER_UNIT

log = logging.getLogger("backhaul.updater")

MANIFEST = "release.manifest"
SIGNATURE = "release.sig"
#: Where the shipped units and the polkit rule go.
SYSTEMD_DIR = Path("/etc/systemd/system")
POLKIT_DIR = Path("/etc/polkit-1/rules.d")
POLKIT_RULE = "50-backhaul-updater.rules"
#: The install root the shipped units are written for; `updater install` writes the real one.
SHIPPED_ROOT = "/opt/backhaul"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wheelhouse_release(wheelhouse: Path, state_dir: Path | None, now: float) -> tuple[str, list[Wheel], bool]:
    """(version, wheels, verified) of the wheelhouse; ReleaseRefused/ConfigError when unusable."""
    if not wheelhouse.is_dir():
        raise ConfigError(f"--wheelhouse {wheelhouse} is not a directory")
    pinned = release_keys.load_pinned(state_dir) if state_dir is not None and state_dir.exists() else []
    manifest_path, sig_path = wheelhouse / MANIFEST, wheelhouse / SIGNATURE
    if pinned and manifest_path.exists() and sig_path.exists():
        manifest = verify(manifest_path.read_bytes(), sig_path.read_bytes(), pinned, now=now, installed=None)
        for entry in manifest.files:
            check_file(entry, wheelhouse / entry.name)
        return manifest.version, [Wheel(f.name, f.sha256) for f in manifest.files], True
    if pinned:
        log.warning(
            "keys are pinned but the wheelhouse has no signed manifest; installing it unverified, as the admin handed it over",
            extra={"wheelhouse": str(wheelhouse)},
        )
    wheels = sorted(wheelhouse.glob("*.whl"))
    versions = []
    for path in wheels:
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename as exc:
            raise ConfigError(f"{path} is not a wheel file name ({exc})") from None
        if canonicalize_name(name) == "backhaul":
            versions.append(str(version))
    if len(versions) != 1:
        raise ConfigError(f"the wheelhouse {wheelhouse} must hold exactly one backhaul wheel; it holds {len(versions)}")
    return versions[0], [Wheel(p.name, _sha256(p)) for p in wheels], False


def first_install(root: Path, wheelhouse: Path, state_dir: Path | None, limits: UpdaterLimits, now: float) -> str:
    """Lay out ``root`` with the wheelhouse's version as current; returns the version."""
    layout = Layout(root, max_history=limits.max_history)
    layout.prepare()
    with RootLock(layout.root):
        state = layout.reconcile()
        try:
            version, wheels, verified = wheelhouse_release(wheelhouse, state_dir, now)
        except ReleaseRefused as exc:
            layout.record(state, None, "refused", f"{exc.reason}: {exc}")
            raise ConfigError(f"the wheelhouse's release is refused ({exc.reason}): {exc}; nothing was installed") from None
        if layout.current_version() == version:
            log.info("already installed and current; nothing to do", extra={"version": version, "root": str(layout.root)})
            return version
        if not verified:
            log.warning(
                "installing the wheelhouse unverified (no pinned key and signed manifest to check it against): trusting the admin who ran this",
                extra={"wheelhouse": str(wheelhouse), "version": version},
            )
        size = sum((wheelhouse / w.name).stat().st_size for w in wheels)
        try:
            layout.check_space(size, limits.disk_factor)
            install_version(
                layout, version, wheelhouse, wheels,
                install_timeout=limits.install_timeout, selftest_timeout=limits.selftest_timeout,
            )
        except UpdateRefused as exc:
            layout.record(state, version, "failed", f"{exc.reason}: {exc}")
            raise ConfigError(f"installing {version} failed: {exc}") from None
        layout.switch(version)
        layout.set_active(state, version)
        layout.record(state, version, "installed", "verified" if verified else "unverified: trusted the admin's wheelhouse")
        log.info("installed", extra={"version": version, "root": str(layout.root), "verified": verified})
        return version


def unit_text(name: str, root: Path, state_dir: Path | None) -> str:
    """A shipped unit (package data) rewritten for ``root`` (and ``state_dir`` for the updater)."""
    text = (importlib.resources.files("backhaul.updater") / "units" / name).read_text()
    text = text.replace(f"{SHIPPED_ROOT}/bin/backhaul", f"{root}/current/venv/bin/backhaul")
    text = text.replace(f"{SHIPPED_ROOT}/current/", f"{root}/current/").replace(f"--install-root {SHIPPED_ROOT}", f"--install-root {root}")
    text = text.replace(f"ReadWritePaths={SHIPPED_ROOT} ", f"ReadWritePaths={root} ")
    if state_dir is not None:
        text = text.replace("/var/lib/backhaul/connector", str(state_dir))
    return text


def install_units(root: Path, state_dir: Path | None) -> list[Path]:
    """Write the connector and updater units and the polkit rule, reload systemd, enable both."""
    written = []
    for name in (CONNECTOR_UNIT, UPDATER_UNIT):
        path = SYSTEMD_DIR / name
        path.write_text(unit_text(name, root, state_dir))
        written.append(path)
    if POLKIT_DIR.is_dir():
        path = POLKIT_DIR / POLKIT_RULE
        path.write_text((importlib.resources.files("backhaul.updater") / "units" / POLKIT_RULE).read_text())
        written.append(path)
    for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", CONNECTOR_UNIT, UPDATER_UNIT]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ConfigError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return written
