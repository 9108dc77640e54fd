"""File verification against hub metadata: sha256 for LFS files, git blob sha1 or size otherwise."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyalbert.hub.manifest import FileEntry

CHUNK = 8 * 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: sha1(b"blob <size>\\0" + content)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def check_file(path: Path, expected: FileEntry) -> str:
    """'' when ``path`` matches ``expected``, else what differs."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size != expected.size:
        return f"size {size} bytes, expected {expected.size}"
    if expected.sha256:
        got = sha256_of(path)
        if got != expected.sha256:
            return f"sha256 {got}, expected {expected.sha256}"
    elif expected.blob_id and size <= 64 * 1024 * 1024:
        got = git_blob_sha1(path)
        if got != expected.blob_id:
            return f"git blob id {got}, expected {expected.blob_id}"
    return ""
