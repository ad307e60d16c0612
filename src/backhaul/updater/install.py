"""Installing one version: a venv at its final path, pip offline with hashes, a self-test.

Nothing here touches ``current``: a version is installed and tested beside the running one,
and a failure removes the half-made version dir and says why (UpdateRefused).

pip does not check a wheel's RECORD hashes (pip #4705): the sha256 values pip is given come
from the signed manifest (or, at a first install without a pinned key, from the files as the
admin handed them over), and ``--require-hashes`` makes pip refuse any file it would install
without one, dependencies included.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from backhaul.updater.layout import Layout, UpdateRefused

log = logging.getLogger("backhaul.updater")

#: Environment variables that would make a venv's python import code other than its own.
_FOREIGN = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")

#: Run by the new venv's python: the package imports (the hot-path codec with it) and reports
#: the installed distribution's version and the version the code itself reports.
_SELFTEST = (
    "import importlib.metadata, backhaul, backhaul.cli, backhaul.protocol.framing, backhaul.connector.service;"
    "print(importlib.metadata.version('backhaul'), backhaul.__version__)"
)


class Wheel(NamedTuple):
    name: str
    sha256: str


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without what would point a venv at foreign code."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in _FOREIGN}


def requirements(wheels: Iterable[Wheel]) -> str:
    """A requirements file naming every wheel by ``name==version`` with its sha256.

    Several wheels of one project and version (platforms) become one line with several hashes.
    """
    lines: dict[tuple[str, str], list[str]] = {}
    for wheel in wheels:
        try:
            name, version, _, _ = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename as exc:
            raise UpdateRefused("malformed", f"{wheel.name} is not a wheel file name ({exc})") from None
        lines.setdefault((canonicalize_name(name), str(version)), []).append(wheel.sha256)
    return "".join(
        f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n"
        for (name, version), hashes in sorted(lines.items())
    )


def pip_command(python: str = sys.executable) -> list[str]:
    """How to run a pip that installs into another venv (``--python``, pip >= 22.3).

    The updater's own venv was made without pip (as every venv here is), so the pip is the
    running interpreter's when it has one, else the wheel that CPython bundles for ensurepip,
    run straight from the wheel (``python pip.whl/pip``, as pip documents for bootstrapping):
    offline, and always there where ``python -m venv`` works.
    """
    if importlib.util.find_spec("pip") is not None and Path(python) == Path(sys.executable):
        return [python, "-m", "pip"]
    import ensurepip

    bundled = sorted(Path(ensurepip.__file__).parent.glob("_bundled/pip-*.whl"))
    if not bundled:
        raise UpdateRefused("install_failed", f"no pip to install with: {python} has none and its ensurepip bundles none")
    return [python, f"{bundled[-1]}/pip"]


def _run(argv: list[str], timeout: float, what: str, env: dict[str, str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UpdateRefused("install_failed", f"{what} took longer than {timeout:g} s") from None
    except OSError as exc:
        raise UpdateRefused("install_failed", f"{what} could not run: {exc.strerror}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise UpdateRefused("install_failed", f"{what} failed (exit {done.returncode}): " + " | ".join(tail))
    return done.stdout


def install_version(
    layout: Layout,
    version: str,
    wheelhouse: Path,
    wheels: list[Wheel],
    *,
    install_timeout: float,
    selftest_timeout: float,
    python: str = sys.executable,
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Install ``wheels`` (all in ``wheelhouse``) as ``version``; returns its venv. ``on_step``
    hears each step's name as it starts (the progress line).

    An existing dir of that version that is not current is a leftover (a crash during an
    earlier install) and is made again from scratch.
    """
    target = layout.version_dir(version)
    if layout.current_version() == version:
        raise UpdateRefused("not_newer", f"version {version} is the current one already")
    if target.exists():
        log.info("removing a leftover install of this version", extra={"version": version, "path": str(target)})
        layout.remove_version(version)
    target.mkdir(parents=True)
    venv = target / "venv"
    env = clean_env()
    try:
        # --without-pip, then a pip from outside with --python: no pip copied into every venv
        # (ensurepip costs ~6 s here) and nothing in it that the release did not ship.
        step = on_step or (lambda _name: None)
        step("creating the venv")
        _run([python, "-m", "venv", "--without-pip", str(venv)], install_timeout, "creating the venv", env)
        reqs = target / "requirements.txt"
        reqs.write_text(requirements(wheels))
        step(f"pip install of {len(wheels)} wheels")
        _run(
            [
                *pip_command(python), "--isolated", "--disable-pip-version-check", "--no-input", "--python", str(venv / "bin" / "python"),
                "install", "--no-index", "--find-links", str(wheelhouse), "--require-hashes", "--only-binary", ":all:",
                "--no-compile", "--quiet", "-r", str(reqs),
            ],
            install_timeout, "pip install of the release", env,
        )
        step("self-test")
        selftest(venv, version, selftest_timeout)
    except BaseException:
        layout.remove_version(version)
        raise
    return venv


def selftest(venv: Path, version: str, timeout: float) -> None:
    """The new install imports, its entry point runs, and both report ``version``."""
    env = clean_env()
    out = _run([str(venv / "bin" / "python"), "-c", _SELFTEST], timeout, "the self-test (imports)", env).split()
    if out != [version, version]:
        raise UpdateRefused(
            "selftest_failed",
            f"the self-test expected version {version}; the installed distribution and backhaul.__version__ say {' and '.join(out) or 'nothing'}",
        )
    _run([str(venv / "bin" / "backhaul"), "--help"], timeout, "the self-test (backhaul --help)", env)
