"""The folder side of the mirror: which folders are repos, their listing, a commit id derived from
it, file digests (hashed once, kept in a JSON sidecar keyed by size and mtime) and a repo's snapshot."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyalbert.hub.errors import HubError
from pyalbert.hub.manifest import MANIFEST_NAME
from pyalbert.hub.mirror.protocol import FileMeta

CACHE_NAME = ".albert-mirror-cache.json"
CACHE_FORMAT = 1
#: never served: our own metadata, VCS and tool caches
SKIPPED_NAMES = frozenset({CACHE_NAME, MANIFEST_NAME})
SKIPPED_DIRS = frozenset({".git", ".cache", ".huggingface"})
READ_CHUNK = 8 * 1024 * 1024


class MirrorError(HubError):
    """The mirror cannot start: a bad root, repo mapping or token setting."""


def parse_repo_mapping(text: str) -> tuple[str, str]:
    """``ORG/NAME=SUBDIR`` -> ``("ORG/NAME", "SUBDIR")``."""
    repo, sep, subdir = text.partition("=")
    repo, subdir = repo.strip(), subdir.strip()
    if not sep or not subdir or repo.count("/") != 1 or not all(repo.split("/")):
        raise MirrorError(
            f"--repo {text!r}: expected ORG/NAME=SUBDIR (a hub repo id, then the folder under the "
            "mirror root that holds its files). Fix: e.g. --repo meta-llama/Llama-3.1-8B=llama-8b.")
    return repo, subdir


def discover_repos(root: Path) -> dict[str, Path]:
    """``ROOT/<org>/<name>`` folders holding at least one file, as ``{"org/name": path}``."""
    found = {}
    for org in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for repo in sorted(p for p in org.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any(list_files(repo)):
                found[f"{org.name}/{repo.name}"] = repo
    return found


@dataclass(frozen=True)
class Listed:
    path: str  # relative, posix
    size: int
    mtime_ns: int


def list_files(folder: Path) -> Iterable[Listed]:
    """Regular files under ``folder`` (symlinks followed, as in a hub cache snapshot), minus our
    own metadata and VCS/tool folders."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if name in SKIPPED_NAMES or name.endswith(".lock"):
                continue
            full = Path(dirpath, name)
            try:
                st = full.stat()
            except OSError:  # a dangling link, or removed meanwhile
                continue
            if not os.path.isfile(full):
                continue
            yield Listed(full.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)


def listing_commit(listing: Iterable[Listed]) -> str:
    """A stable 40-hex commit id for a folder's state: sha1 of (name, size, mtime) rows."""
    digest = hashlib.sha1(b"albert-mirror/1\n")
    for item in sorted(listing, key=lambda x: x.path):
        digest.update(f"{item.path}\0{item.size}\0{item.mtime_ns}\n".encode())
    return digest.hexdigest()


def hash_file(path: Path, *, lfs: bool) -> str:
    """sha256 of the content (LFS) or its git blob sha1, read in chunks."""
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\x00" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DigestCache:
    """``{key: (size, mtime_ns, lfs, digest)}`` kept in a JSON sidecar; written atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict] = {}
        self._dirty = False
        self._lock = threading.Lock()
        self.save_error = ""
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("format") == CACHE_FORMAT:
                    self._entries = dict(data.get("files", {}))
            except (OSError, ValueError):  # unreadable or damaged: rebuilt on the next save
                self._entries = {}

    def get(self, key: str, size: int, mtime_ns: int, lfs: bool) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry and (entry.get("size"), entry.get("mtime_ns"), entry.get("lfs")) == (size, mtime_ns, lfs):
            return entry.get("digest")
        return None

    def put(self, key: str, size: int, mtime_ns: int, lfs: bool, digest: str) -> None:
        with self._lock:
            self._entries[key] = {"size": size, "mtime_ns": mtime_ns, "lfs": lfs, "digest": digest}
            self._dirty = True

    def keep_only(self, keys: set[str]) -> None:
        with self._lock:
            for key in set(self._entries) - keys:
                del self._entries[key]
                self._dirty = True

    def save(self) -> None:
        """Write if changed; a read-only root only costs the next start a rehash."""
        with self._lock:
            if not self._dirty or self.path is None:
                return
            text = json.dumps({"format": CACHE_FORMAT, "files": self._entries}, indent=1, sort_keys=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(text + "\n")
                os.replace(tmp, self.path)
                self._dirty = False
                self.save_error = ""
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                self.save_error = f"{self.path}: {exc.strerror or exc}"


@dataclass(frozen=True)
class RepoSnapshot:
    repo_id: str
    folder: Path
    commit: str
    files: dict[str, FileMeta]

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.files.values())

