"""Where a restart in place spends its time (bench/zero_downtime.py, the no-room row).

Two independent views of one restart:

- the server's own start, seen from inside the host (:class:`ServerWatch`, a poller run in the
  host's network namespace): the new process's start time (``/proc/PID/stat``) and the first 200
  of its ``/health`` (polled every 20 ms on the host's loopback);
- the engine's steps, timed in the bench's process (:class:`EngineClock`): the route written out,
  the drain's end, the stop and start commands, readiness seen, the route written back.

Every time is ``time.monotonic()`` (one clock for every process of the machine).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import pyalbert.config  # noqa: F401  (first: engine.session alone imports in a cycle)
from pyalbert.engine import session, vllm_replace
from pyalbert.remote import SSHRunner

POLLER = r"""
import os, sys, time, urllib.request
port = sys.argv[1]
tick = os.sysconf("SC_CLK_TCK")
def procs():
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        # the server itself (python -m vllm...), not the `albert supervise start ... -- argv`
        # that launched it (nor its supervisor), which carry the same arguments
        if argv[1:3] == [b"-m", b"vllm.entrypoints.openai.api_server"] and b"--port" in argv \
                and argv[argv.index(b"--port") + 1] == port.encode():
            start = int(stat.rsplit(")", 1)[1].split()[19]) / tick
            found[int(pid)] = time.monotonic() - (time.clock_gettime(time.CLOCK_BOOTTIME) - start)
    return found
seen, healthy = {}, None
while True:
    for pid, t in procs().items():
        if pid not in seen:
            seen[pid] = t
            print("proc", pid, t, flush=True)
    try:
        code = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.3).status
    except Exception:
        code = 0
    if (code == 200) != healthy:
        healthy = code == 200
        print("health", int(healthy), time.monotonic(), flush=True)
    time.sleep(0.02)
"""


class ServerWatch:
    """The server on ``port`` of ``host``, watched from inside the host while the block runs."""

    def __init__(self, host, port: int):
        self.host, self.port = host, port
        self.procs: dict[int, float] = {}
        self.health: list[tuple[float, bool]] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[ServerWatch]:
        argv = ["nsenter", f"--net=/run/netns/{self.host.netns}", sys.executable, "-c", POLLER,
                str(self.port)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            yield self
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
            for line in out.splitlines():
                kind, a, b = line.split()
                if kind == "proc":
                    self.procs[int(a)] = float(b)
                else:
                    self.health.append((float(b), a == "1"))

    def server_start(self, after: float) -> tuple[float, float] | None:
        """(the first process started after ``after``, its first healthy /health)."""
        started = sorted(t for t in self.procs.values() if t >= after)
        if not started:
            return None
        ok = [t for t, up in self.health if up and t >= started[0]]
        return (started[0], ok[0]) if ok else None


class EngineClock:
    """The engine's steps during a replace, patched in (time.monotonic of each step's end)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.events: list[tuple[str, float, float]] = []  # (what, began, ended)
        self._patch(mp)

    def _record(self, what: str, fn):
        def timed(*args, **kwargs):
            began = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((what(*args, **kwargs) if callable(what) else what, began,
                                    time.monotonic()))
        return timed

    def _patch(self, mp: pytest.MonkeyPatch) -> None:
        def run_kind(self_, cmd, *a, **k) -> str:
            text = cmd.render()
            for verb in ("stop", "start"):
                if f"supervise {verb} " in text and "-vllm-" in text:
                    # one call stops and starts (a restart in place): counted as the start
                    return verb
            return "other"

        mp.setattr(SSHRunner, "run", self._record(run_kind, SSHRunner.run))
        mp.setattr(vllm_replace.Gateways, "point", self._record(
            lambda self_, slots, url, *a, **k: "route out" if url is None else "route in",
            vllm_replace.Gateways.point))
        mp.setattr(vllm_replace.VllmReplace, "drain",
                   self._record("drain", vllm_replace.VllmReplace.drain))
        mp.setattr(session.HostSession, "wait_ready",
                   self._record("wait ready", session.HostSession.wait_ready))

    def first(self, what: str, after: float = 0.0) -> tuple[float, float] | None:
        return next(((b, e) for w, b, e in self.events if w == what and b >= after), None)

    def clear(self) -> None:
        self.events.clear()


def breakdown(load, clock: EngineClock, watch: ServerWatch) -> dict | None:
    """The outage as clients saw it, the server's own start, and the engine's overhead."""
    out = clock.first("route out")
    if out is None or not load.failed_at:
        return None
    first_failed = min(t for t in load.failed_at if t >= out[0])
    back = min((t for t in load.sent_at if t > max(load.failed_at)), default=float("nan"))
    outage = back - first_failed
    start = clock.first("start", out[1])
    # a restart in one call (`supervise start --replace`): no stop of its own (a later stop is
    # another slot's)
    stop = clock.first("stop", out[1])
    if start and (stop is None or stop[0] > start[0]):
        stop = (start[0], start[0])
    ready = clock.first("wait ready", out[1])
    back_in = clock.first("route in", out[1])
    server = watch.server_start(stop[0] if stop else out[1])
    parts = {"stop": stop, "start": start, "wait ready": ready, "route in": back_in,
             "server start": server}
    if not all(parts.values()):
        return {"outage": outage, "not seen": [k for k, v in parts.items() if not v],
                "steps": sorted({w for w, _, _ in clock.events})}
    proc, healthy = server
    return {  # the outage is the sum of the parts from "server start" on
        "outage": outage, "server start": healthy - proc, "overhead": outage - (healthy - proc),
        "1st 503 -> stop (drain)": stop[0] - first_failed,
        "stop": stop[1] - stop[0],
        "stop -> start cmd": start[0] - stop[1],
        "start cmd (stop+start) -> process": proc - start[0],
        "healthy -> ready seen": ready[1] - healthy,
        "ready -> route in": back_in[1] - ready[1],
        "route in -> 1st OK": back - back_in[1],
    }
