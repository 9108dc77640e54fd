"""The one fan-out: work on every host at once, one runner each, one outcome per host.

Used by deploy, rollback, releases, status, lock/unlock/down, the GPU lease, provision and setup.
A failure on one host never stops the others; Ctrl-C sets the cancel event, waits for every host
to undo its unfinished work, then raises :class:`Interrupted` with the outcomes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

from pyalbert.config.environment import HostSpec
from pyalbert.errors import AlbertError
from pyalbert.remote import Runner, SshMaterial, SSHRunner
from pyalbert.ui import console

T = TypeVar("T")
RunnerFactory = Callable[[HostSpec], Runner]


class Interrupted(AlbertError):
    """Ctrl-C: every host undid its unfinished work; ``results`` says where each one ended."""

    exit_code = 130

    def __init__(self, message: str, results: Sequence[object] = ()):
        super().__init__(message)
        self.results = list(results)


@dataclass
class HostOutcome(Generic[T]):
    host: str
    value: T | None = None
    error: BaseException | None = None
    seconds: float = 0.0


def ssh_runners(spec, material: SshMaterial | None = None) -> RunnerFactory:
    """SSH runners for the hosts of ``spec`` (key and known hosts: ``material``, else the
    environment variables the ``[ssh]`` section names, read now)."""
    given = material or SshMaterial.from_environ(spec.env.ssh)
    return lambda host: SSHRunner(host, spec.env.ssh, given)


def fan_out(hosts: Sequence[HostSpec], work: Callable[[Runner, HostSpec, threading.Event], T],
            runners: RunnerFactory, *, on_interrupt: str = "interrupted: waiting for the hosts...",
            ) -> list[HostOutcome[T]]:
    """``work(runner, host, cancel)`` on every host at once; outcomes in the hosts' order."""
    cancel = threading.Event()

    def one(host: HostSpec) -> HostOutcome[T]:
        start = time.monotonic()
        runner = None
        try:
            runner = runners(host)
            return HostOutcome(host.name, work(runner, host, cancel), None, time.monotonic() - start)
        except Exception as exc:  # reported per host; the others go on
            return HostOutcome(host.name, None, exc, time.monotonic() - start)
        finally:
            getattr(runner, "close", lambda: None)()

    interrupted = False
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts))), thread_name_prefix="host") as pool:
        futures = [pool.submit(one, h) for h in hosts]
        pending = set(futures)
        while pending:
            try:
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            except KeyboardInterrupt:
                interrupted = True
                cancel.set()
                console.print(f"[yellow]{on_interrupt}[/]")
    outcomes = [f.result() for f in futures]
    if interrupted:
        raise Interrupted("interrupted (Ctrl-C)", outcomes)
    return outcomes


def values(outcomes: Sequence[HostOutcome]) -> dict[str, object]:
    """host -> value, or the AlbertError it raised; anything else is a bug and is raised."""
    out: dict[str, object] = {}
    for o in outcomes:
        if o.error is not None and not isinstance(o.error, AlbertError):
            raise o.error
        out[o.host] = o.error if o.error is not None else o.value
    return out


def raise_errors(results: dict[str, object], what: str) -> None:
    errors = {h: v for h, v in results.items() if isinstance(v, AlbertError)}
    if errors:
        raise AlbertError(f"{what} failed on {len(errors)} of {len(results)} host(s): " + "; ".join(
            str(e) if str(e).startswith(f"host {h}") else f"{h}: {e}" for h, e in errors.items()))
