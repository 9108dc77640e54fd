"""The hub's HTTP protocol as pure functions: routes, headers, JSON bodies, ranges.

Shared by the mirror (``albert hub serve``) and the in-memory test hub (``tests/support/hubserver.py``):
one implementation of what the huggingface_hub client expects.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

#: file names the hub stores in LFS (the mirror has no .gitattributes to ask)
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".pt", ".msgpack", ".h5", ".onnx")
#: any file at least this big is treated as LFS too
LFS_MIN_SIZE = 1024 * 1024
DEFAULT_REVISION = "main"
#: longest header value sent (error messages quote client input)
MAX_HEADER_VALUE = 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: sha1(b"blob <size>\\0" + data)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileMeta:
    """What the hub says about one file: size, git blob id and, for LFS files, the sha256."""

    size: int
    blob_id: str  # of the content, or of the LFS pointer for LFS files
    sha256: str | None = None  # set exactly for LFS files

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        return self.sha256 if self.sha256 is not None else self.blob_id

    @classmethod
    def of(cls, size: int, *, lfs: bool, sha256: str | None = None, blob_id: str | None = None) -> FileMeta:
        """From a digest: the sha256 for an LFS file, the blob id otherwise."""
        if lfs:
            assert sha256 is not None
            return cls(size, git_blob_sha1(lfs_pointer(sha256, size)), sha256)
        assert blob_id is not None
        return cls(size, blob_id)

    @classmethod
    def of_bytes(cls, path: str, data: bytes) -> FileMeta:
        if is_lfs(path, len(data)):
            return cls.of(len(data), lfs=True, sha256=hashlib.sha256(data).hexdigest())
        return cls.of(len(data), lfs=False, blob_id=git_blob_sha1(data))


def model_info(repo_id: str, commit: str, files: Mapping[str, FileMeta], *, blobs: bool,
               private: bool = False, gated: bool = False) -> dict:
    """The body of ``GET /api/models/{repo}/revision/{rev}`` (siblings' sizes with ``blobs``)."""
    siblings = []
    for path, meta in sorted(files.items()):
        sib: dict = {"rfilename": path}
        if blobs:
            sib.update(size=meta.size, blobId=meta.blob_id)
            if meta.sha256 is not None:
                sib["lfs"] = {"size": meta.size, "sha256": meta.sha256, "pointerSize": 134}
        siblings.append(sib)
    return {
        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
        "sha": commit, "private": private, "gated": "manual" if gated else False, "disabled": False,
        "tags": [], "library_name": "transformers", "siblings": siblings,
        "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
    }


def tree(files: Mapping[str, FileMeta], prefix: str = "") -> list[dict]:
    """The body of ``GET /api/models/{repo}/tree/{rev}[/{prefix}]`` (recursive: files, then dirs)."""
    entries, dirs = [], set()
    for path, meta in sorted(files.items()):
        if prefix and not path.startswith(prefix.rstrip("/") + "/"):
            continue
        parts = path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
        item: dict = {"type": "file", "oid": meta.blob_id, "size": meta.size, "path": path}
        if meta.sha256 is not None:
            item["lfs"] = {"oid": meta.sha256, "size": meta.size, "pointerSize": 134}
        entries.append(item)
    entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)]
    return entries


def file_headers(commit: str, meta: FileMeta) -> dict[str, str]:
    """Headers of a ``resolve`` answer (without Content-Length / Content-Range)."""
    headers = {
        "X-Repo-Commit": commit,
        "ETag": f'"{meta.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if meta.sha256 is not None:
        headers["X-Linked-Etag"] = f'"{meta.sha256}"'
        headers["X-Linked-Size"] = str(meta.size)
    return headers


def header_value(text: str, limit: int = MAX_HEADER_VALUE) -> str:
    """``text`` as a safe header value: printable ASCII only (CR, LF, other controls and non-ASCII
    characters become ``\\r``, ``\\xe9``, ``\\u2603`` escapes), at most ``limit`` characters.

    Error messages quote decoded client input (a revision, a path): a CR/LF there would start a
    header line of the client's choosing, and a character outside latin-1 cannot be sent at all.
    """
    out = "".join(ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def error_headers(code: str, message: str, commit: str | None = None) -> dict[str, str]:
    headers = {"X-Error-Code": header_value(code), "X-Error-Message": header_value(message),
               "Content-Type": "application/json"}
    if commit:
        headers["X-Repo-Commit"] = commit
    return headers


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class RangeNotSatisfiable(ValueError):
    """``Range`` starts at or past the end of the file: answer 416."""


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` (inclusive) asked by a ``Range: bytes=a-b`` header, ``None`` for the whole
    file (no header, or a form we do not support, such as several ranges)."""
    match = _RANGE.match((header or "").strip())
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:  # bytes=-N: the last N bytes
        n = int(match[2])
        if n == 0:
            raise RangeNotSatisfiable(header)
        return max(size - n, 0), size - 1
    first = int(match[1])
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(header)
    return first, last


@dataclass(frozen=True)
class Route:
    kind: str  # "info" | "tree" | "resolve"
    repo: str
    revision: str
    path: str = ""  # the file (resolve) or folder (tree), decoded


_ROUTES = (
    ("info", re.compile(r"^/api/models/(?P<repo>.+?)/revision/(?P<rev>[^/]+)$")),
    ("tree", re.compile(r"^/api/models/(?P<repo>.+?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("resolve", re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("info", re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)$")),  # no revision: main
)


def match_route(url_path: str) -> Route | None:
    """Which hub endpoint a request path is (query string excluded), or ``None``."""
    for kind, pattern in _ROUTES:
        match = pattern.match(url_path)
        if match:
            groups = match.groupdict()
            return Route(kind, unquote(groups["repo"]), unquote(groups.get("rev") or DEFAULT_REVISION),
                         unquote(groups.get("path") or ""))
    return None


def bearer_token(authorization: str | None) -> str | None:
    value = (authorization or "").strip()
    if value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None
