"""Real releases of this project for the updater's end-to-end tests: wheels, wheelhouses, signatures.

A release is built from a copy of the source tree (git ls-files, untracked files included) with
the version bumped in pyproject.toml and in ``backhaul._SOURCE_VERSION``, and optionally a
patch (a release that cannot start), by ``pip wheel --no-deps --no-build-isolation``.
The dependency wheels are the versions installed in the running interpreter, fetched once
with ``pip download`` (this machine's package index) into a cache dir keyed by that list.
Both caches live under ~/.cache/backhaul-test (BACKHAUL_TEST_CACHE overrides), keyed by
content, so later runs take no time and need no index.

The backhaul wheels are built without the Cython extension (BACKHAUL_NO_EXT=1): a build
with it costs ~20 s each and the updater's tests never touch the codec. A process that runs
such an install must not have BACKHAUL_REQUIRE_EXT=1 (the Cython pass of tools/test.sh sets
it): ``release_env()`` gives the environment to run them with.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BACKHAUL_TEST_CACHE", Path.home() / ".cache" / "backhaul-test"))
#: The version of the source tree the releases are bumped from.
SOURCE_VERSION_LINE = '_SOURCE_VERSION = "'


@dataclass(frozen=True)
class Release:
    version: str
    wheel: Path
    #: The backhaul wheel and every dependency wheel, in one directory (what `updater install` takes).
    wheelhouse: Path

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.wheelhouse.glob("*.whl"))


def release_env(**extra: str) -> dict[str, str]:
    """The environment for processes that run a test release (see the module docstring).

    PYTHONPATH stays: the updater under test runs from the source tree; it keeps PYTHONPATH
    away from the venvs it makes itself (updater.install.clean_env). BACKHAUL_REQUIRE_EXT is
    set to 0 rather than removed, so that harness.Proc (which adds to os.environ) keeps it off."""
    return {**os.environ, "BACKHAUL_REQUIRE_EXT": "0", **extra}


def _source_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    return sorted(name for name in out.decode().split("\0") if name and (REPO / name).exists() and not name.endswith(".so"))


def _source_hash(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        path = REPO / name
        digest.update(name.encode() + b"\0")
        digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return digest.hexdigest()[:16]


def _dependency_pins() -> list[str]:
    """``name==version`` of every distribution backhaul needs at run time, as installed here."""
    env = default_environment()
    text = (REPO / "pyproject.toml").read_text()
    import tomllib

    # (requirement, the extras of the requirement that named it): a dependency's own
    # requirements count when their marker holds with no extra or with one asked for
    # (psycopg[binary] needs psycopg-binary only through ``extra == "binary"``).
    todo = [(Requirement(r), frozenset()) for r in tomllib.loads(text)["project"]["dependencies"]]
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras)
        ):
            continue
        name = canonicalize_name(req.name)
        asked = frozenset(req.extras)
        if (name, asked) in seen:
            continue
        seen.add((name, asked))
        dist = importlib.metadata.distribution(req.name)
        pins[name] = dist.version
        todo.extend((Requirement(r), asked) for r in (dist.requires or []))
    return sorted(f"{name}=={version}" for name, version in pins.items())


def dependency_wheels() -> Path:
    """The directory of dependency wheels (downloaded once, then cached)."""
    pins = _dependency_pins()
    key = hashlib.sha256(("\n".join(pins) + sys.version).encode()).hexdigest()[:16]
    target = CACHE / "wheels" / key
    if (target / ".complete").exists():
        return target
    tmp = target.with_name(key + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "--dest", str(tmp), *pins],
        check=True, capture_output=True, timeout=600,
    )
    (tmp / ".complete").write_text("\n".join(pins))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _copy_tree(files: list[str], dest: Path) -> None:
    for name in files:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def build_release(version: str, *, patch: dict[str, tuple[str, str]] | None = None) -> Release:
    """A release of the source tree at ``version``; ``patch`` maps a file to (old, new) text replaced once."""
    files = _source_files()
    patch = patch or {}
    key = hashlib.sha256(f"{_source_hash(files)} {version} {sorted(patch.items())!r}".encode()).hexdigest()[:16]
    home = CACHE / "releases" / f"{version}-{key}"
    wheelhouse = home / "wheelhouse"
    if not (home / ".complete").exists():
        # One build per version name is kept: the cache does not grow with every edit.
        for stale in home.parent.glob(f"{version}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        src = home / "src"
        _copy_tree(files, src)
        pyproject = src / "pyproject.toml"
        text = pyproject.read_text()
        old = next(line for line in text.splitlines() if line.startswith("version = "))
        pyproject.write_text(text.replace(old, f'version = "{version}"', 1))
        init = src / "src" / "backhaul" / "__init__.py"
        text = init.read_text()
        old = next(line for line in text.splitlines() if line.startswith(SOURCE_VERSION_LINE))
        init.write_text(text.replace(old, f'{SOURCE_VERSION_LINE}{version}"', 1))
        for name, (before, after) in patch.items():
            path = src / name
            text = path.read_text()
            assert before in text, f"the patch for {name} does not apply: {before!r} is not in it"
            path.write_text(text.replace(before, after, 1))
        out = home / "dist"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
            check=True, capture_output=True, timeout=600, env=release_env(BACKHAUL_NO_EXT="1"),
        )
        wheelhouse.mkdir()
        (wheel,) = out.glob("backhaul-*.whl")
        shutil.copy2(wheel, wheelhouse / wheel.name)
        for dep in dependency_wheels().glob("*.whl"):
            shutil.copy2(dep, wheelhouse / dep.name)
        shutil.rmtree(src)
        (home / ".complete").write_text(version)
    (wheel,) = wheelhouse.glob("backhaul-*.whl")
    return Release(version=version, wheel=wheel, wheelhouse=wheelhouse)


def sign_wheelhouse(release: Release, private_key, dest: Path, *, expires_in: float = 86400, issued: float | None = None) -> Path:
    """A copy of the release's wheelhouse with ``release.manifest`` and ``release.sig`` (signed by ``private_key``)."""
    from backhaul.release.manifest import FileEntry, Manifest, key_id, sign

    dest.mkdir(parents=True)
    entries = []
    for path in release.files:
        shutil.copy2(path, dest / path.name)
        entries.append(FileEntry(path.name, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size))
    now = int(time.time() if issued is None else issued)
    manifest = Manifest(
        version=release.version, issued=now, expires=int(now + expires_in), files=tuple(entries), key_id=key_id(private_key.public_key())
    )
    (dest / "release.manifest").write_bytes(manifest.to_bytes())
    (dest / "release.sig").write_bytes(sign(manifest, private_key))
    return dest
