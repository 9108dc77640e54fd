"""Backends that change while the gateway runs: the routes folder, watched.

The gateway starts with the release's ``backends.json`` (model id -> the replicas' *base* URLs).
During a model replace the deploy engine writes one small file per replica in the routes folder
(``{base_dir}/routes-{env}/<unit>.json``, atomic rename; :mod:`pyalbert.commands.routes`)::

    {"model": "m", "base": "http://10.0.0.5:8000", "url": "http://10.0.0.5:26000", "retry_after": 5}

``url`` is where that replica serves now (the spare port during and after a side-by-side
replace), ``null`` while it is out of rotation (drained before a stop; the model's requests then
go to its other replicas, or get 503 with ``Retry-After`` when it has none).

Why a watched folder rather than SIGHUP or an admin endpoint: every uvicorn worker of every api
colour polls it on its own (a SIGHUP with several workers makes uvicorn restart them, and an
endpoint would have to reach each worker of each colour, with a credential to guard); a colour
started later reads the same folder, so no update is missed across an api redeploy; the engine
on a model host only needs to write a file on the gateway's host, the one thing it already does.
A scan is a ``stat`` of a few files every :data:`POLL_S` seconds (~30 µs: 0.1% of a core at 20 Hz);
files are parsed only when one changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

#: how often a gateway worker looks at the routes folder (a ``stat`` of a few files; the engine
#: waits one poll + a margin before it trusts a route is applied, and a model's only replica
#: restarting in place is back in service within one poll of its route being written)
POLL_S = 0.05
#: what a client is told to wait when a model's only replica is out of rotation
DEFAULT_RETRY_AFTER = 5


@dataclass(frozen=True)
class Route:
    """One replica's current address (``url`` None: out of rotation)."""

    model: str
    base: str
    url: str | None
    retry_after: int = DEFAULT_RETRY_AFTER


def parse_route(text: str) -> Route | None:
    """A route file's content; None when it is not one (half-written files never exist: the
    engine renames them into place, but a hand-made file must not stop the gateway)."""
    try:
        data = json.loads(text)
        url = data.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith("http://")):
            return None
        retry = int(data.get("retry_after", DEFAULT_RETRY_AFTER))
        return Route(str(data["model"]), str(data["base"]).rstrip("/"),
                     url.rstrip("/") if url else None, max(1, retry))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def effective_backends(base: Mapping[str, Iterable[str]], routes: Iterable[Route]
                       ) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
    """Pure: the release's backends with the routes applied -> (model -> URLs, model -> the
    Retry-After its out-of-rotation replicas ask for). Routes of unknown models are ignored."""
    by_base = {(r.model, r.base): r for r in routes}
    out: dict[str, tuple[str, ...]] = {}
    retry: dict[str, int] = {}
    for model, urls in base.items():
        now: list[str] = []
        for url in urls:
            route = by_base.get((model, url.rstrip("/")))
            if route is None:
                now.append(url.rstrip("/"))
            elif route.url:
                now.append(route.url)
            else:
                retry[model] = max(retry.get(model, 0), route.retry_after)
        out[model] = tuple(dict.fromkeys(now))
    return out, retry


def read_routes(folder: str) -> list[Route]:
    routes = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.endswith(".json") and entry.is_file():
                with contextlib.suppress(OSError), open(entry.path, encoding="utf-8") as f:
                    route = parse_route(f.read())
                    if route is not None:
                        routes.append(route)
    return routes


def signature(folder: str) -> tuple:
    """What changes when a route file is written (rename: new inode and mtime)."""
    try:
        return tuple(sorted((e.name, e.inode(), e.stat().st_mtime_ns) for e in os.scandir(folder)
                            if e.name.endswith(".json")))
    except (FileNotFoundError, NotADirectoryError):
        return ()


class BackendsWatcher:
    """Applies the routes folder to a router (:meth:`pyalbert.api.routing.Router.set_backends`)."""

    def __init__(self, base: Mapping[str, Iterable[str]], folder: str,
                 apply: Callable[[dict[str, tuple[str, ...]], dict[str, int]], None],
                 *, poll_s: float = POLL_S, log: Callable[[dict], None] | None = None):
        self.base = {m: tuple(urls) for m, urls in base.items()}
        self.folder, self.apply, self.poll_s, self.log = folder, apply, poll_s, log
        self._seen: tuple | None = None
        self.current: tuple[dict[str, tuple[str, ...]], dict[str, int]] = (dict(self.base), {})
        self.task: asyncio.Task | None = None

    def scan(self) -> bool:
        """Apply the folder when it changed; True when the backends changed."""
        seen = signature(self.folder)
        if seen == self._seen:
            return False
        self._seen = seen
        now = effective_backends(self.base, read_routes(self.folder))
        if now == self.current:
            return False
        self.current = now
        self.apply(*now)
        if self.log:
            self.log({"event": "backends_reloaded", "backends": {m: list(u) for m, u in now[0].items()},
                      "out_of_rotation": now[1]})
        return True

    async def run(self) -> None:
        while True:
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 - a bad folder must not stop the watching
                if self.log:
                    self.log({"event": "backends_reload_failed", "error": repr(exc)})
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        self.scan()
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def watcher_for(settings, router, log: Callable[[dict], None] | None = None) -> BackendsWatcher | None:
    """The watcher of a gateway started with a routes folder (``--routes DIR``), else None."""
    if not settings.routes_dir:
        return None
    return BackendsWatcher(settings.backends, settings.routes_dir, router.set_backends,
                           poll_s=settings.routes_poll_s, log=log)
