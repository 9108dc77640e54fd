"""``Mirror``: the repos served (folders -> snapshots, hashed once) and the server around them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from pyalbert.hub.mirror.folders import (
    CACHE_NAME,
    DigestCache,
    Listed,
    MirrorError,
    RepoSnapshot,
    discover_repos,
    hash_file,
    list_files,
    listing_commit,
)
from pyalbert.hub.mirror.protocol import FileMeta, is_lfs
from pyalbert.hub.mirror.server import (
    IO_TIMEOUT_S,
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT_S,
    MirrorHandler,
    MirrorServer,
    server_url,
)


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
