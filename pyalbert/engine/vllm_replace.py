"""Replace a vLLM server without downtime (issue 15, item 4).

With room on the host (GPUs: the ``gpu_mem_use`` budget; CPU: free RAM against an estimate) the
new server starts in the idle slot beside the one that serves, on the model's spare port; once
ready the gateways route the replica to it (the routes folder they watch,
:mod:`pyalbert.commands.routes`), the old server drains (its in-flight requests end, bounded by
``deploy.drain_timeout_s``) and stops. Without room the engine says so first, takes the replica
out of rotation (the gateway sends its requests to the other replicas, or answers 503 with
``Retry-After``), drains, stops and starts in place; at most ``deploy.max_unavailable`` replicas
of a model do that at once across hosts (:class:`ModelRoll`). On failure the old server serves
again and the route points back at it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal

from pyalbert.api.backends_reload import POLL_S
from pyalbert.commands import routes
from pyalbert.engine.fanout import Interrupted, RunnerFactory
from pyalbert.remote import DryRunner, Runner
from pyalbert.runtimes import facts
from pyalbert.runtimes.base import Unit
from pyalbert.runtimes.slots import VllmSlots, cpu_no_room, url_of

if TYPE_CHECKING:
    from pyalbert.engine.host import HostDeploy

#: seconds a client is told to wait while a model's only replica restarts in place
RESTART_RETRY_AFTER = 5
#: a route written, every gateway worker has applied it: each scans the folder every POLL_S
#: (its next scan starts at most POLL_S after the write lands), plus a margin for a busy loop.
#: For a model's only replica this wait is part of the outage; requests sent before it are
#: counted by the server's gauges, which the drain waits out.
GATEWAYS_APPLIED_S = POLL_S + 0.25
#: readiness polls while a model's only replica restarts in place (its outage; else the
#: context's ``ALBERT_READY_POLL_S``, 0.5 s)
GAP_POLL_S = 0.05


def choose(live: Unit | None, no_room: str | None) -> Literal["start", "beside", "restart"]:
    """Pure: nothing serves -> start; room for a second server -> beside; else restart in place."""
    if live is None:
        return "start"
    return "beside" if no_room is None else "restart"


class ModelRoll:
    """Across the hosts of one deploy: replicas of a model out of rotation at once."""

    def __init__(self, max_unavailable: int = 1):
        self.max_unavailable = max_unavailable
        self._lock = threading.Lock()
        self._slots: dict[str, threading.Semaphore] = defaultdict(
            lambda: threading.Semaphore(self.max_unavailable))

    @contextlib.contextmanager
    def out_of_rotation(self, model: str, cancel: threading.Event) -> Iterator[None]:
        with self._lock:
            sem = self._slots[model]
        while not sem.acquire(timeout=0.2):
            if cancel.is_set():
                raise Interrupted(f"interrupted (Ctrl-C) while waiting for {model}'s other replicas")
        try:
            yield
        finally:
            sem.release()


class Gateways:
    """A replica's route on every gateway host (each host writes only its replicas' files)."""

    def __init__(self, hd: HostDeploy, runners: RunnerFactory | None):
        self.hd, self.factory = hd, runners
        self._runners: dict[str, Runner] = {}

    def _runner(self, host) -> Runner | None:
        if host.name == self.hd.hp.host.name:
            return self.hd.r
        if isinstance(self.hd.r, DryRunner):  # the dry-run shows them in this host's transcript
            return DryRunner(host.name, self.hd.r.commands)
        if self.factory is None:
            return None
        if host.name not in self._runners:
            self._runners[host.name] = self.factory(host)
        return self._runners[host.name]

    def runners(self) -> list[Runner]:
        settings = self.hd.hp.replace
        hosts = settings.gateways if settings else ()
        return [r for r in (self._runner(h) for h in hosts) if r is not None]

    def point(self, slots: VllmSlots, url: str | None, retry_after: int = RESTART_RETRY_AFTER,
              *, check_first: bool = False) -> None:
        folder = self.hd.hp.replace.routes_dir if self.hd.hp.replace else ""
        text = routes.route_text(slots.model, slots.base_url, url, retry_after)
        for r in self.runners():
            if check_first and r.run(routes.read(folder, slots.route), check=False).stdout == text:
                continue
            r.run(routes.point(folder, slots.route, slots.model, slots.base_url, url, retry_after))

    def close(self) -> None:
        for r in self._runners.values():
            getattr(r, "close", lambda: None)()
        self._runners.clear()


class VllmReplace:
    """One vLLM unit's replace on one host (``hd``: the host's deploy session)."""

    def __init__(self, hd: HostDeploy):
        self.hd = hd
        self.r = hd.r

    def live(self, u: Unit) -> Unit | None:
        """The slot that serves now (planned unit of that slot), or None."""
        assert u.slots is not None
        for slot in (u, u.slots.other):
            if self.hd.state(slot).running:
                return slot
        return None

    def no_room(self, u: Unit) -> str | None:
        slots = u.slots
        assert slots is not None
        if slots.memory_probe is None:
            return slots.gpu_no_room
        return cpu_no_room(self.r.run(slots.memory_probe, check=False).stdout, slots.kv_gib)

    def run(self, u: Unit) -> Unit:
        """Replace ``u``'s server; returns the unit (slot) that serves at the end."""
        assert u.slots is not None
        live = self.live(u)
        why = self.no_room(u) if live is not None else None
        kind = choose(live, why)
        if kind == "start":
            self._start_fresh(u)
            return u
        assert live is not None
        if kind == "beside":
            new = u.slots.other if live is u else u
            self._beside(u.slots, live, new)
            return new
        self.hd.say(f"no room on host {self.hd.name} for a second {u.slots.model} server ({why}): "
                    f"restarting {live.name} in place; meanwhile the gateway sends its requests "
                    "to the other replicas, or answers 503 with Retry-After", "yellow")
        self._restart(u.slots, live)
        return live

    def settle(self, u: Unit, serving: Unit) -> None:
        """``serving`` already runs ``u``'s config: make the route point at it and stop the
        other slot if it still runs (a replace killed between its switch and its stop)."""
        assert u.slots is not None
        self.hd.gateways.point(u.slots, url_of(serving), check_first=True)
        other = u.slots.other if serving is u else u
        if self.hd.state(other).running:
            self.hd.say(f"{other.name} still runs beside {serving.name}: draining and stopping it")
            self.drain(other)
            self.r.run(other.stop, check=False)

    def _start_fresh(self, u: Unit) -> None:
        hd, slots = self.hd, u.slots
        assert slots is not None
        hd.say(f"starting {u.name} (config {u.config_hash})")
        hd.undo.append(lambda: self.r.run(u.stop, check=False))
        self._start(u)
        hd.gateways.point(slots, url_of(u), check_first=True)

    def _start(self, unit: Unit) -> None:
        self.r.run(unit.stop)
        for f in unit.files:
            self.r.run(f.cmd())
        self.hd._start(unit)

    def _beside(self, slots: VllmSlots, live: Unit, new: Unit) -> None:
        hd = self.hd
        old = hd.recorded(live.name) or live  # the serving server as recorded (its own start)
        state = {"stopped_old": False, "routed": False}
        hd.say(f"starting {new.name} on port {new.port} beside {live.name} (config {new.config_hash})")

        def undo() -> None:
            self.r.run(new.stop, check=False)
            if state["stopped_old"]:
                self.r.run(old.start, check=False)
                hd.wait_ready(old, quiet=True)
            if state["routed"] or state["stopped_old"]:
                hd.gateways.point(slots, url_of(old))

        hd.undo.append(undo)
        self._start(new)
        state["routed"] = True
        hd.gateways.point(slots, url_of(new))
        self.drain(live)
        hd.check_cancel()
        state["stopped_old"] = True
        self.r.run(live.stop, check=False)
        hd.say(f"{slots.model}: the gateway routes to {new.name}; {live.name} drained and stopped",
               "green")

    def _restart(self, slots: VllmSlots, live: Unit) -> None:
        hd = self.hd
        old = hd.recorded(live.name)
        roll = hd.roll or ModelRoll(1)
        with roll.out_of_rotation(slots.model, hd.cancel):
            def undo() -> None:
                self.r.run(live.stop, check=False)
                if old is not None and old.config_hash != live.config_hash:
                    hd.say(f"rolling back {live.name} to its previous release")
                    self.r.run(old.start, check=False)
                    hd.wait_ready(old, quiet=True)
                hd.gateways.point(slots, url_of(live))

            hd.undo.append(undo)
            # before the gap, while the server still serves: its files, its runtime checked
            # (a vLLM venv: `import vllm`, seconds), its compile cache probed
            for f in live.files:
                self.r.run(f.cmd())
            if live.prepare is not None:
                self.r.run(live.prepare)
            warm = facts.warm(self.r, live)
            hd.gateways.point(slots, None, RESTART_RETRY_AFTER)
            self.drain(live)
            if live.replace is None:
                self.r.run(live.stop)
            hd._start(live, poll_s=GAP_POLL_S, warm=warm, cmd=live.replace)
            hd.gateways.point(slots, url_of(live))

    def drain(self, old: Unit) -> None:
        """Wait until every gateway re-read its routes (:data:`GATEWAYS_APPLIED_S`) and ``old``
        holds no request (vLLM's running + waiting gauges), at most ``deploy.drain_timeout_s``."""
        hd = self.hd
        timeout = hd.hp.replace.drain_timeout_s if hd.hp.replace else 120
        deadline = time.monotonic() + timeout
        wait: Callable[[float], object] = hd.cancel.wait
        wait(GATEWAYS_APPLIED_S)
        while True:
            res = self.r.run(routes.in_flight(url_of(old)), check=False)
            n = routes.parse_in_flight(res.stdout) if res.known else 0
            if not n:
                return
            if time.monotonic() > deadline:
                hd.say(f"{old.name} still holds {n} request(s) after {timeout:g}s: stopping it",
                       "yellow")
                return
            wait(0.2)
