"""Model id -> replicas: least-outstanding-requests balancing and passive health.

A replica is *ejected* when a connection to it fails or it answers 5xx; a background probe
(``GET /v1/models``, which vLLM answers 200 only once the model is loaded) brings it back.
Replicas start unprobed (not healthy) and are probed at once, so ``/ready`` tells the truth
while vLLM loads. When every replica of a model is ejected the router still uses them all
("panic mode", as Envoy does) rather than refusing: a single-replica model then recovers on the
next request instead of waiting for the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence

import orjson

from pyalbert.api.upstream import Pool, UpstreamError


class Replica:
    __slots__ = ("model", "url", "pool", "outstanding", "healthy", "ejected_at", "reason",
                 "card", "served")

    def __init__(self, model: str, url: str, connect_timeout: float, api_key: str | None = None):
        self.model = model
        self.url = url.rstrip("/")
        self.pool = Pool(self.url, connect_timeout=connect_timeout, api_key=api_key)
        self.outstanding = 0
        self.healthy = False
        self.ejected_at = time.monotonic()
        self.reason = "not probed yet"
        #: the replica's own /v1/models entry for this model (max_model_len, ...)
        self.card: dict | None = None
        self.served = 0


class Router:
    def __init__(self, backends: Mapping[str, Sequence[str]], *, connect_timeout: float = 5.0,
                 probe_interval: float = 1.0, probe_timeout: float = 5.0,
                 api_key: str | None = None):
        self.models: dict[str, list[Replica]] = {
            model: [Replica(model, url, connect_timeout, api_key) for url in urls]
            for model, urls in backends.items()
        }
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.connect_timeout, self.api_key = connect_timeout, api_key
        #: model -> Retry-After (s) while its replicas are out of rotation (routes folder)
        self.retry_after: dict[str, int] = {}
        self._probes: dict[Replica, asyncio.Task] = {}
        self._turn = 0

    def set_backends(self, backends: Mapping[str, Sequence[str]],
                     retry_after: Mapping[str, int] | None = None) -> list[Replica]:
        """Route to ``backends`` from now on (:mod:`pyalbert.api.backends_reload`): replicas
        that stay keep their state; a removed one takes no new request, and the requests it
        runs finish (they hold it); its idle connections close. Returns the removed replicas."""
        old = {(r.model, r.url): r for r in self.replicas}
        models: dict[str, list[Replica]] = {}
        for model, urls in backends.items():
            models[model] = [old.pop((model, u.rstrip("/")), None)
                             or Replica(model, u, self.connect_timeout, self.api_key) for u in urls]
        self.models = models
        self.retry_after = dict(retry_after or {})
        for replica in old.values():
            task = self._probes.pop(replica, None)
            if task is not None:
                task.cancel()
            replica.healthy, replica.reason = False, "removed from the backends"
            replica.pool.close_idle()
        with contextlib.suppress(RuntimeError):  # no running loop: probed at start()
            for replica in self.replicas:
                if not replica.healthy:
                    self._watch(replica)
        return list(old.values())

    @property
    def replicas(self) -> list[Replica]:
        return [r for reps in self.models.values() for r in reps]

    def pick(self, model: str, exclude: Replica | None = None) -> Replica | None:
        """The healthy replica with the fewest requests in flight (all of them if none is)."""
        replicas = self.models[model]
        if not replicas:
            return None
        if len(replicas) == 1:
            only = replicas[0]
            return None if only is exclude else only
        self._turn += 1
        start = self._turn % len(replicas)
        best: Replica | None = None
        fallback: Replica | None = None
        for i in range(len(replicas)):
            rep = replicas[(start + i) % len(replicas)]
            if rep is exclude:
                continue
            if rep.healthy:
                if best is None or rep.outstanding < best.outstanding:
                    best = rep
            elif fallback is None or rep.outstanding < fallback.outstanding:
                fallback = rep
        return best or fallback

    def healthy_models(self) -> list[str]:
        return [m for m, reps in self.models.items() if any(r.healthy for r in reps)]

    def ready(self) -> tuple[bool, dict[str, int]]:
        counts = {m: sum(r.healthy for r in reps) for m, reps in self.models.items()}
        return all(counts.values()), counts

    # -- passive health --------------------------------------------------------------------
    def eject(self, replica: Replica, reason: str) -> None:
        was_healthy = replica.healthy
        replica.healthy = False
        replica.reason = reason
        if was_healthy:
            replica.ejected_at = time.monotonic()
        self._watch(replica)

    def succeeded(self, replica: Replica) -> None:
        replica.served += 1

    def _watch(self, replica: Replica) -> None:
        task = self._probes.get(replica)
        if task is None or task.done():
            self._probes[replica] = asyncio.get_running_loop().create_task(self._probe_until_up(replica))

    def start(self) -> None:
        """Probe every replica now (call from inside the running loop)."""
        for replica in self.replicas:
            self._watch(replica)

    async def stop(self) -> None:
        tasks = [t for t in self._probes.values() if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._probes.clear()

    async def probe(self, replica: Replica) -> str | None:
        """None if the replica serves its model, else why not."""
        try:
            resp = await replica.pool.request(b"GET", b"/v1/models",
                                              first_byte_timeout=self.probe_timeout,
                                              total_timeout=self.probe_timeout)
            try:
                body = await resp.read()
            finally:
                resp.close()
        except UpstreamError as exc:
            return str(exc)
        if resp.status != 200:
            return f"GET /v1/models answered {resp.status}"
        try:
            for card in orjson.loads(body).get("data", []):
                if card.get("id") == replica.model:
                    replica.card = card
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return None

    async def _probe_until_up(self, replica: Replica) -> None:
        while True:
            try:
                why = await self.probe(replica)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the probing
                why = f"probe failed: {exc!r}"
            if why is None:
                replica.healthy = True
                replica.reason = ""
                return
            replica.healthy = False
            replica.reason = why
            await asyncio.sleep(self.probe_interval)
