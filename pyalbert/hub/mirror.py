"""A model mirror that speaks the hub's HTTP API: ``albert hub serve``.

Air-gapped hosts (and the local one-machine environment) point ``HF_ENDPOINT`` at it and the
unchanged huggingface_hub client (``model_info(files_metadata=True)``, ``snapshot_download``,
``hf_hub_download``) downloads from a folder of model directories:

- ``GET /api/models/{repo}/revision/{rev}[?blobs=true]``: commit sha + siblings (size, blobId, lfs)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the
  sha256 with ``X-Linked-Etag``/``X-Linked-Size`` for LFS files), ``Range`` -> 206
- errors carry the hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)

The protocol pieces (routes, headers, JSON bodies, ranges) are pure functions, shared with the
in-memory test hub (``tests/support/hubserver.py``). The disk side gives each repo a commit sha
derived from its listing (names, sizes, mtimes) and hashes each file once: digests are kept in
``ROOT/.albert-mirror-cache.json`` keyed by (size, mtime), so a restart rehashes nothing that did
not change. Bodies go out with ``sendfile``: serving a 100 GB model costs no memory.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from pyalbert.hub.errors import HubError
from pyalbert.hub.manifest import MANIFEST_NAME

#: file names the hub stores in LFS (the mirror has no .gitattributes to ask)
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".pt", ".msgpack", ".h5", ".onnx")
#: any file at least this big is treated as LFS too
LFS_MIN_SIZE = 1024 * 1024
CACHE_NAME = ".albert-mirror-cache.json"
CACHE_FORMAT = 1
#: never served: our own metadata, VCS and tool caches
SKIPPED_NAMES = frozenset({CACHE_NAME, MANIFEST_NAME})
SKIPPED_DIRS = frozenset({".git", ".cache", ".huggingface"})
DEFAULT_REVISION = "main"
READ_CHUNK = 8 * 1024 * 1024
#: connections handled at once (one thread each); more are answered 503 + Retry-After at once
MAX_CONNECTIONS = 64
#: a request head (line + headers) must arrive within this, counted from when the connection
#: starts waiting for it (so it is also the keep-alive idle timeout)
REQUEST_TIMEOUT_S = 20.0
#: any single read or write that makes no progress for this long ends the connection
IO_TIMEOUT_S = 60.0
#: longest header value sent (error messages quote client input)
MAX_HEADER_VALUE = 1024


class MirrorError(HubError):
    """The mirror cannot start: a bad root, repo mapping or token setting."""


# -- protocol (pure) ----------------------------------------------------------------------------

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


# -- the folder side ----------------------------------------------------------------------------

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


class Mirror:
    """Serve folders as hub repos.

    ``Mirror(root)`` serves every ``root/<org>/<name>``; ``repos`` adds or overrides
    ``{"org/name": subdir}`` (relative to ``root``, or absolute). ``token``: every request must
    carry ``Authorization: Bearer <token>``. ``index()`` hashes what is new (call it before
    serving so the first download does not wait); requests see files changed later (new commit).
    """

    def __init__(self, root: Path | str, repos: Mapping[str, Path | str] | None = None, *,
                 token: str | None = None, discover: bool = True,
                 cache_path: Path | None | bool = True) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise MirrorError(f"mirror root {self.root} is not a directory. Fix: pass --root a folder "
                              "holding <org>/<name> model directories.")
        self.repo_dirs: dict[str, Path] = discover_repos(self.root) if discover else {}
        for repo_id, subdir in (repos or {}).items():
            folder = (self.root / subdir).resolve()
            if not folder.is_dir():
                raise MirrorError(f"--repo {repo_id}={subdir}: {folder} is not a directory. Fix: "
                                  f"give a folder under {self.root} (or an absolute path).")
            self.repo_dirs[repo_id] = folder
        if not self.repo_dirs:
            raise MirrorError(f"no model directory to serve under {self.root}: expected "
                              f"{self.root}/<org>/<name>/ folders with files. Fix: lay models out "
                              "that way, or map folders with --repo ORG/NAME=SUBDIR.")
        self.token = token or None
        if cache_path is True:
            cache_path = self.root / CACHE_NAME
        self.cache = DigestCache(cache_path or None)
        self.hashed_files = 0  # files hashed by this process (not found in the cache)
        self.hashed_bytes = 0
        self._snapshots: dict[str, tuple[tuple[Listed, ...], RepoSnapshot]] = {}
        self._locks = {repo_id: threading.Lock() for repo_id in self.repo_dirs}
        self._count_lock = threading.Lock()
        self.log: Callable[[str], None] | None = None

    # -- content ------------------------------------------------------------------------------
    def _cache_key(self, folder: Path, rel: str) -> str:
        full = folder / rel
        try:
            return full.relative_to(self.root).as_posix()
        except ValueError:
            return str(full)

    def snapshot(self, repo_id: str) -> RepoSnapshot | None:
        """The repo's current state (``None``: not served); hashes only new or changed files."""
        folder = self.repo_dirs.get(repo_id)
        if folder is None:
            return None
        with self._locks[repo_id]:
            listing = tuple(list_files(folder))
            known = self._snapshots.get(repo_id)
            if known is not None and known[0] == listing:
                return known[1]
            files = {}
            for item in listing:
                lfs = is_lfs(item.path, item.size)
                key = self._cache_key(folder, item.path)
                digest = self.cache.get(key, item.size, item.mtime_ns, lfs)
                if digest is None:
                    digest = hash_file(folder / item.path, lfs=lfs)
                    self.cache.put(key, item.size, item.mtime_ns, lfs, digest)
                    with self._count_lock:
                        self.hashed_files += 1
                        self.hashed_bytes += item.size
                files[item.path] = FileMeta.of(item.size, lfs=lfs, sha256=digest if lfs else None,
                                               blob_id=None if lfs else digest)
            snap = RepoSnapshot(repo_id, folder, listing_commit(listing), files)
            self._snapshots[repo_id] = (listing, snap)
        self.cache.save()
        return snap

    def index(self) -> list[RepoSnapshot]:
        """Every repo, hashed; drops cache entries of files that are gone."""
        snaps = [s for r in sorted(self.repo_dirs) if (s := self.snapshot(r)) is not None]
        self.cache.keep_only({self._cache_key(s.folder, p) for s in snaps for p in s.files})
        self.cache.save()
        return snaps

    # -- serving ------------------------------------------------------------------------------
    def make_server(self, host: str = "127.0.0.1", port: int = 8090, *,
                    max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S,
                    io_timeout_s: float = IO_TIMEOUT_S) -> MirrorServer:
        """The HTTP server (not started): at most ``max_connections`` handler threads, a request
        head due within ``request_timeout_s``, every socket operation within ``io_timeout_s``."""
        mirror = self

        class Handler(MirrorHandler):
            pass

        Handler.mirror = mirror
        return MirrorServer((host, port), Handler, max_connections=max_connections,
                            request_timeout_s=request_timeout_s, io_timeout_s=io_timeout_s)

    def serve_in_thread(self, host: str = "127.0.0.1", port: int = 0,
                        **options) -> tuple[str, Callable[[], None]]:
        """Start serving in a daemon thread: ``(url, stop)``; ``port=0`` picks a free port;
        ``options`` go to :meth:`make_server`."""
        server = self.make_server(host, port, **options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return server_url(server), stop


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


#: the answer when every slot is taken: clients (huggingface_hub included) retry a 503
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
               b"X-Error-Code: Busy\r\nX-Error-Message: mirror busy, retry\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")


class MirrorServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; the handler enforces the
    timeouts. A connection over the cap gets :data:`BUSY_ANSWER` from the accepting thread
    (non-blocking: a client that does not read cannot stall the accept loop)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, io_timeout_s: float = IO_TIMEOUT_S) -> None:
        if max_connections < 1 or request_timeout_s <= 0 or io_timeout_s <= 0:
            raise MirrorError(f"the mirror cannot serve with max_connections={max_connections}, "
                              f"request_timeout_s={request_timeout_s}, io_timeout_s={io_timeout_s}. "
                              "Fix: --max-connections 1 or more (default 64); timeouts above 0.")
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.io_timeout_s = io_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections answered 503 because every slot was taken
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)
            try:  # read what already arrived, so that closing sends FIN, not RST
                while request.recv(65536):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            request.send(BUSY_ANSWER)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):  # a client gone or too slow
            super().handle_error(request, client_address)


class _HeadDeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by the I/O timeout and, while a request head is
    awaited, by what is left of its deadline: a head sent a byte at a time is cut all the same."""

    def __init__(self, handler: MirrorHandler) -> None:
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        handler = self.handler
        timeout = handler.server.io_timeout_s
        if handler.head_deadline is not None:
            left = handler.head_deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            timeout = min(timeout, left)
        handler.connection.settimeout(timeout)
        return handler.connection.recv_into(buffer)


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mirror: Mirror
    server: MirrorServer
    server_version = "albert-hub-mirror"
    head_deadline: float | None = None

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.io_timeout_s)  # writes (sendfile included) too
        plain, self.rfile = self.rfile, io.BufferedReader(_HeadDeadlineReader(self))
        plain.close()  # (the socket's own file: closed, or the socket would outlive the handler)

    def handle_one_request(self) -> None:
        # the head of the next request is due within request_timeout_s (idle keep-alive included);
        # past it, a read raises TimeoutError, which the stdlib turns into closing the connection
        self.head_deadline = time.monotonic() + self.server.request_timeout_s
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.head_deadline = None  # the head is in: the answer only has the I/O timeout
        return ok

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        if self.mirror.log is not None:
            self.mirror.log(header_value(f"{self.address_string()} {format % args}", 4096))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.mirror.log is None:
            return
        status = getattr(code, "value", code)
        wanted = self.headers.get("Range") if self.headers is not None else None
        self.mirror.log(header_value(f'"{self.requestline}" {status}' + (f" range={wanted}" if wanted else ""),
                                     4096))

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _send(self, status: int, headers: Mapping[str, str], body: bytes = b"", *, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, header_value(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, commit: str | None = None, *, head: bool) -> None:
        self._send(status, error_headers(code, message, commit), error_body(message), head=head)

    def _handle(self, *, head: bool) -> None:
        try:
            self._route(head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        route = match_route(url.path)
        if route is None:
            return self._error(404, "NotFound", "no such endpoint", head=head)
        mirror = self.mirror
        if mirror.token is not None:
            token = bearer_token(self.headers.get("Authorization"))
            if token is None:
                return self._error(401, "GatedRepo", "This mirror needs a token: send "
                                   "'Authorization: Bearer <token>' (set HF_TOKEN).", head=head)
            if not hmac.compare_digest(token.encode(), mirror.token.encode()):
                return self._error(403, "GatedRepo", "This mirror refused the token.", head=head)
        snap = mirror.snapshot(route.repo)
        if snap is None:
            return self._error(404, "RepoNotFound", "Repository not found", head=head)
        if route.revision not in (DEFAULT_REVISION, snap.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {route.revision}", head=head)
        if route.kind == "info":
            body = json.dumps(model_info(snap.repo_id, snap.commit, snap.files,
                                         blobs="blobs" in parse_qs(url.query))).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head=head)
        if route.kind == "tree":
            body = json.dumps(tree(snap.files, route.path)).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head=head)
        meta = snap.files.get(route.path)
        if meta is None:
            return self._error(404, "EntryNotFound", f"{route.path} does not exist", snap.commit, head=head)
        self._file(snap, route.path, meta, head=head)

    def _file(self, snap: RepoSnapshot, path: str, meta: FileMeta, *, head: bool) -> None:
        headers = file_headers(snap.commit, meta)
        try:
            wanted = None if head else byte_range(self.headers.get("Range"), meta.size)
        except RangeNotSatisfiable:
            return self._send(416, {**headers, "Content-Range": f"bytes */{meta.size}"}, head=head)
        try:
            fh = open(snap.folder / path, "rb")  # noqa: SIM115 - closed below, after sendfile
        except OSError:  # removed since the listing
            return self._error(404, "EntryNotFound", f"{path} does not exist", snap.commit, head=head)
        with fh:
            first, last = wanted if wanted is not None else (0, meta.size - 1)
            count = last - first + 1
            if wanted is not None:
                headers["Content-Range"] = f"bytes {first}-{last}/{meta.size}"
            self.send_response(206 if wanted is not None else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(count))
            self.end_headers()
            if head or count <= 0:
                return
            sent = self.connection.sendfile(fh, first, count)
            if sent < count:  # the file shrank while being sent: the client must not trust it
                self.close_connection = True
