"""The publisher's side: `backhaul release keygen` and `backhaul admin release publish`.

The manifest is built and signed here, on the admin's machine: the signing key never leaves
it. The relay gets the manifest, the signature and the public key (it checks the signature,
but a connector trusts only the keys pinned on it), then each file as a raw body streamed
from disk, so a 30 MB wheelhouse never sits in memory nor in one JSON body.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.parser
import hashlib
import ssl
import sys
import time
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from backhaul import tlsconfig
from backhaul.progress import Progress
from backhaul.errors import CertificateError, ConfigError, ServiceError
from backhaul.release import keys
from backhaul.release.manifest import PROJECT, FileEntry, Manifest, ReleaseRefused, check_file_name, key_id, sign

#: Seconds an upload may wait for the relay between two reads or writes (not the whole upload).
UPLOAD_IDLE_TIMEOUT = 60.0
#: Largest JSON answer read from the relay.
MAX_ANSWER = 1024 * 1024
#: Bytes read at a time while hashing a wheel.
_CHUNK = 1 << 20
#: A METADATA file larger than this is not one a wheel builder wrote.
_MAX_METADATA = 1024 * 1024


def keygen(args: argparse.Namespace) -> int:
    """Handler of `backhaul release keygen`."""
    kid = keys.generate(Path(args.private), Path(args.public))
    print(kid)
    print(
        f"release signing key {kid}: private key {args.private} (0600; keep it offline, off the relay), "
        f"public key {args.public} (pin it on connectors: `connector register --release-key {args.public}`)",
        file=sys.stderr,
    )
    return 0


def _metadata_version(path: Path) -> str:
    """The Version field of a wheel's METADATA (what pip will install)."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise ConfigError(f"{path} has {len(names)} .dist-info/METADATA files, not one: is it a wheel?")
            info = wheel.getinfo(names[0])
            if info.file_size > _MAX_METADATA:
                raise ConfigError(f"{path}: its METADATA is larger than {_MAX_METADATA} bytes")
            text = wheel.read(info).decode("utf-8", "replace")
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"{path} is not a readable wheel (zip) file: {exc}") from None
    version = email.parser.Parser().parsestr(text, headersonly=True).get("Version")
    if not version:
        raise ConfigError(f"{path}: its METADATA has no Version")
    return version.strip()


def _entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(name=path.name, sha256=digest.hexdigest(), size=size)


def collect(wheels: list[str]) -> tuple[str, dict[str, Path]]:
    """(the release version, file name -> path) of a wheelhouse given on the command line.

    The version is the backhaul wheel's (its file name, checked against its METADATA);
    refused: anything not a wheel, no backhaul wheel, backhaul wheels of two versions, two
    files of the same name.
    """
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    files: dict[str, Path] = {}
    versions: dict[str, Path] = {}
    for arg in wheels:
        path = Path(arg)
        if not path.is_file():
            raise ConfigError(f"{path} is not a file")
        try:
            check_file_name(path.name)
            name, version, _, _ = parse_wheel_filename(path.name)
        except (ReleaseRefused, InvalidWheelFilename) as exc:
            raise ConfigError(f"{path} is not a wheel ({exc}); a release holds wheels only (`pip wheel`)") from None
        if path.name in files:
            raise ConfigError(f"{path.name} is given twice")
        files[path.name] = path
        if name == canonicalize_name(PROJECT):
            stated = _metadata_version(path)
            if stated != str(version):
                raise ConfigError(f"{path}: its file name says version {version}, its METADATA {stated}")
            versions.setdefault(str(version), path)
    if not versions:
        raise ConfigError(f"none of the files is a {PROJECT} wheel; a release is the {PROJECT} wheel plus the wheels it depends on")
    if len(versions) > 1:
        raise ConfigError(f"{PROJECT} wheels of several versions were given ({', '.join(sorted(versions))}); publish one version at a time")
    return next(iter(versions)), files


def build(wheels: list[str], private_key, *, expires_days: float, now: float) -> tuple[Manifest, bytes, bytes, dict[str, Path]]:
    """(manifest, its bytes, signature, name -> path) for a wheelhouse."""
    if not expires_days > 0:
        raise ConfigError("--expires must be a positive number of days")
    version, files = collect(wheels)

    issued = int(now)
    manifest = Manifest(
        version=version,
        issued=issued,
        expires=issued + max(1, int(expires_days * 86400)),
        files=tuple(_entry(path) for _, path in sorted(files.items())),
        key_id=key_id(private_key.public_key()),
    )
    try:
        data = manifest.to_bytes()
    except ReleaseRefused as exc:
        raise ConfigError(f"cannot publish this release: {exc}") from None
    return manifest, data, sign(manifest, private_key), files


async def _json(session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], **kwargs: Any) -> Any:
    async with session.request(method, url, headers=headers, **kwargs) as resp:
        raw = await resp.content.read(MAX_ANSWER + 1)
        status = resp.status
    import orjson

    try:
        decoded = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        decoded = None
    if status >= 400:
        if isinstance(decoded, dict) and "detail" in decoded:
            raise ServiceError(f"{decoded['detail']} ({decoded.get('reason') or decoded.get('error', status)})")
        raise ServiceError(f"{method} {url} answered HTTP {status}")
    if not isinstance(decoded, dict):
        raise ServiceError(f"{method} {url} answered something that is not a JSON object; is this a backhaul relay?")
    return decoded


async def _read_counted(path: Path, progress: Progress) -> AsyncIterator[bytes]:
    """The file's bytes from disk (read off the event loop), each chunk counted on ``progress``."""
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            progress.advance(len(chunk))
            yield chunk


async def upload(target, manifest_bytes: bytes, signature: bytes, public_pem: bytes, auto: bool, files: dict[str, Path]) -> dict[str, Any]:
    """Store the manifest, then every file the relay still misses; the relay's last answer."""
    ctx = tlsconfig.admin_context(target.ca)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=UPLOAD_IDLE_TIMEOUT)
    auth = {"Authorization": f"Bearer {target.token}"}
    body = {
        "manifest": base64.b64encode(manifest_bytes).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
        "public_key": public_pem.decode("ascii"),
        "auto": auto,
    }
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as session:
            release = await _json(session, "POST", f"{target.service_url}/v1/releases", auth, json=body)
            answer = release
            missing = release["missing"]
            sizes = {name: files[name].stat().st_size for name in missing}
            with Progress(f"uploading release {release['version']}", total=sum(sizes.values())) as progress:
                for i, name in enumerate(missing, 1):
                    url = f"{target.service_url}/v1/releases/{urllib.parse.quote(release['version'], safe='')}/files/{urllib.parse.quote(name, safe='')}"
                    progress.stage(f"uploading release {release['version']}: file {i} of {len(missing)}")
                    headers = {**auth, "Content-Type": "application/octet-stream", "Content-Length": str(sizes[name])}
                    answer = await _json(session, "PUT", url, headers, data=_read_counted(files[name], progress))
            return answer
    except aiohttp.ClientConnectorCertificateError as exc:
        raise CertificateError(
            f"the service at {target.service_url} did not present a certificate from the expected CA ({exc.certificate_error})"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise ServiceError(f"cannot reach the service at {target.service_url} ({exc.strerror or exc})") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, ssl.SSLError) as exc:
        raise ServiceError(f"the upload to {target.service_url} failed ({exc.__class__.__name__}: {exc}); run the same publish again to resume") from exc


def publish(args: argparse.Namespace, target) -> dict[str, Any]:
    """Build, sign and upload a release; the relay's answer for its last step."""
    private_key = keys.load_private(Path(args.signing_key))
    manifest, data, signature, files = build(args.wheels, private_key, expires_days=args.expires, now=time.time())
    answer = asyncio.run(upload(target, data, signature, keys.public_pem(private_key.public_key()), args.auto, files))
    return {**answer, "version": manifest.version, "key_id": manifest.key_id, "expires": manifest.expires, "files": len(manifest.files)}
