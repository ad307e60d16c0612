"""Tiny but valid wheels for release tests (METADATA, WHEEL, RECORD with hashes).

A real wheel of the project is what the updater tests build; the release store and the
publish CLI only need files that are wheels by name and structure.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(directory: Path, name: str, version: str, payload: bytes = b"", *, metadata_version: str | None = None) -> Path:
    """``directory/NAME-VERSION-py3-none-any.whl``; ``payload`` goes into a data file (to size it)."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{dist}/payload.bin": payload,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {metadata_version or version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: backhaul-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items()) + f"{info}/RECORD,,\n"
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        # Fixed member times: the same arguments make the same bytes (as reproducible builds do).
        for member, data in [*files.items(), (f"{info}/RECORD", record.encode())]:
            wheel.writestr(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return path
