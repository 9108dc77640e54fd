"""One host's session in a deploy or rollback: preflight, the deploy lock, unit state, readiness.

:class:`HostSession` holds the runner, the host plan and the cancel event; the deploy sequence
itself is :class:`pyalbert.engine.host.HostDeploy`. Against the dry-run's recording runner every
probe's outcome is unknown: checks are shown, not judged, and a readiness wait asks once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

from pyalbert.commands import health, lock
from pyalbert.commands.ray import ClusterReady
from pyalbert.engine.context import RunContext
from pyalbert.engine.fanout import Interrupted
from pyalbert.engine.host_plans import HostPlan
from pyalbert.engine.report import HostResult, Printer
from pyalbert.errors import AlbertError
from pyalbert.remote import Runner
from pyalbert.runtimes import facts
from pyalbert.runtimes.base import Unit
from pyalbert.runtimes.checks import HostFacts


class NotReady(AlbertError):
    pass


#: during a restart in place each readiness call waits on the host itself (polls every 20 ms)
#: for at most this long: the model is seen back within ~20 ms + one round trip
HOST_WAIT_S = 1.0
#: a Ray node that exits while its group's other nodes restart (a worker whose head is not up
#: yet: `ray start --address` gives up) is restarted by its runtime and joins later: its
#: restarts are not a crash loop until this long after its start
RAY_JOIN_GRACE_S = 60.0


class HostSession:
    def __init__(self, runner: Runner, hp: HostPlan, out: Printer, cancel: threading.Event,
                 ctx: RunContext, *, message: str = ""):
        self.r, self.hp, self.out, self.cancel, self.ctx = runner, hp, out, cancel, ctx
        self.message = message
        self.name = hp.host.name
        self.rt = hp.runtime
        self.result = HostResult(self.name, release=hp.release_id)

    def say(self, text: str, style: str = "") -> None:
        self.out(self.name, text, style)

    def state(self, unit: Unit) -> facts.UnitState:
        return facts.state(self.r, self.rt, unit)

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Interrupted(f"host {self.name}: interrupted (Ctrl-C)")

    # -- preflight and lock
    def preflight(self) -> None:
        host = HostFacts(self.hp.host.user, self.hp.env, self.hp.base_dir,
                         lambda: facts.running_names(self.r, self.rt, self.hp.env))
        problems = []
        for check in self.hp.checks:
            problem = check.verdict(self.r.run(check.cmd, check=False), host)
            if problem:
                problems.append(problem)
                if check.blocking:
                    break
        if problems:
            raise AlbertError(f"host {self.name}: " + " ".join(problems))

    def take_lock(self) -> None:
        details = lock.details(who=self.ctx.who, when=self.ctx.now_iso(), release=self.hp.release_id,
                               message=self.message, pid=os.getpid(), pipeline=self.ctx.pipeline)
        if self.r.run(lock.acquire(self.hp.base_dir, details), check=False).ok:
            return
        holder = lock.describe_holder(self.r.run(lock.show(self.hp.base_dir), check=False).stdout,
                                      now=self.ctx.clock())
        raise AlbertError(
            f"host {self.name} is locked by {holder}. Nothing was changed. Fix: wait for that "
            f"deploy to end, or if it died run `fab unlock --env {self.hp.env}`.")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Preflight, take the host's deploy lock, release it whatever happens."""
        self.preflight()
        self.take_lock()
        try:
            yield
        finally:
            self.r.run(lock.release(self.hp.base_dir), check=False)

    # -- readiness
    def tail(self, u: Unit) -> str:
        text = self.r.run(u.logs, check=False).stdout.strip().splitlines()[-20:]
        return "\n".join(f"    {line}" for line in text) or "    (no output)"

    def wait_port(self, u: Unit, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.r.run(health.port_listeners(u.port or 0), check=False)
            if res.stdout.strip() or not res.known:
                return
            self.cancel.wait(0.1)
        raise NotReady(f"host {self.name}: {u.name} does not listen on port {u.port} after "
                       f"{timeout:g}s.\nLogs:\n{self.tail(u)}")

    def wait_ready(self, u: Unit, *, quiet: bool = False, poll_s: float | None = None) -> None:
        """``/health`` is 200 then ``/v1/models`` lists the model; refused/503 are waited out.

        ``poll_s``: a shorter interval than the context's, while the model is out of service (a
        restart in place), each call then waiting on the host (:data:`HOST_WAIT_S`); the
        crash-loop check keeps its own pace (every 4 polls of the context)."""
        if u.ready is None:
            return
        t0 = time.monotonic()
        deadline = t0 + self.hp.ready_timeout_s
        poll = poll_s or self.ctx.poll_s
        here = HOST_WAIT_S if poll_s else 0.0
        every = max(1 if here else 4, round(4 * self.ctx.poll_s / (poll + here)))
        healthy, polls, last = False, 0, "no answer"
        judge_crashes_from = t0 + (RAY_JOIN_GRACE_S if u.service == "ray" else 0.0)
        while True:
            if not quiet:
                self.check_cancel()
            ready, healthy, last = self._poll_ready(u, healthy, last, here)
            if ready:
                break
            polls += 1
            if polls % every == 0 and time.monotonic() >= judge_crashes_from:
                self._refuse_crash_loop(u)
            if time.monotonic() > deadline:
                raise NotReady(
                    f"host {self.name}: {u.name} was not ready after {self.hp.ready_timeout_s:g}s "
                    f"({last}). Fix: read the log lines below; raise deploy.ready_timeout_s if the "
                    f"model only loads slowly.\nLast log lines:\n{self.tail(u)}")
            if not quiet:
                self.cancel.wait(poll)
            else:
                time.sleep(poll)
        if not quiet:
            self.say(f"{u.name} ready in {time.monotonic() - t0:.1f}s")

    def _poll_ready(self, u: Unit, healthy: bool, last: str, here_s: float = 0.0
                    ) -> tuple[bool, bool, str]:
        """One poll: (ready, healthy, what was last seen); ``here_s``: the host polls /health
        itself for that long, then lists the models in the same call."""
        assert u.ready is not None
        if isinstance(u.ready, ClusterReady):  # a Ray node: the head lists the whole group
            res = self.r.run(u.ready.cmd(), check=False)
            ready, seen = u.ready.judge(res.stdout) if res.known else (True, "")
            return ready, ready, seen
        if here_s and not healthy and u.ready.model is not None:
            res = self.r.run(u.ready.models_once_healthy(here_s), check=False)
            if not res.known:
                return True, True, last
            code, ids = health.parse_models_once_healthy(res.stdout)
            if code != 200:
                return False, False, f"/health answered {code or 'nothing'}"
            if u.ready.model in ids:
                return True, True, last
            return False, True, f"/v1/models lists {ids or 'nothing'}"
        if not healthy:
            res = self.r.run(u.ready.health(), check=False)
            code = health.parse_status(res.stdout)
            healthy, last = code == 200 or not res.known, f"/health answered {code or 'nothing'}"
        if not healthy:
            return False, healthy, last
        if u.ready.model is None:
            return True, healthy, last
        res = self.r.run(u.ready.models(), check=False)
        ids = health.models_listed(res.stdout)
        if u.ready.model in ids or not res.known:
            return True, healthy, last
        return False, healthy, f"/v1/models lists {ids or 'nothing'}"

    def _refuse_crash_loop(self, u: Unit) -> None:
        running, restarts = facts.running_and_restarts(self.r, self.rt, u)
        if not running or restarts > 0:
            raise NotReady(f"host {self.name}: {u.name} exited before it was ready.\n"
                           f"Last log lines:\n{self.tail(u)}")
