"""Work on every host of an environment at once: one outcome per host, failures per host.

Used by provisioning, the setup stage and the deploy tasks; a failure on one host never stops
the others, and each outcome says how long its host took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from rich.markup import escape

from pyalbert.config.environment import HostSpec
from pyalbert.ui import console

T = TypeVar("T")


@dataclass
class HostOutcome:
    host: str
    value: object = None
    error: BaseException | None = None
    seconds: float = 0.0


def on_hosts(hosts: Sequence[HostSpec], work: Callable[[HostSpec], T]) -> list[HostOutcome]:
    """Run ``work(host)`` for every host at once; one outcome per host, in the hosts' order."""

    def one(host: HostSpec) -> HostOutcome:
        start = time.monotonic()
        try:
            return HostOutcome(host.name, work(host), None, time.monotonic() - start)
        except Exception as exc:  # reported per host; the others go on
            return HostOutcome(host.name, None, exc, time.monotonic() - start)

    if len(hosts) == 1:
        return [one(hosts[0])]
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        return list(pool.map(one, hosts))


def print_summary(outcomes: Sequence[HostOutcome], what: str) -> int:
    """One line per host; returns the number of failed hosts."""
    failed = 0
    for o in outcomes:
        if o.error is not None:
            failed += 1
            console.print(f"[red]✗ {o.host}[/] {what} failed ({o.seconds:.1f}s): {escape(str(o.error))}",
                          soft_wrap=True)
        else:
            summary = o.value.summary() if hasattr(o.value, "summary") else str(o.value)
            console.print(f"[green]✓ {o.host}[/] {escape(summary)} ({o.seconds:.1f}s)", soft_wrap=True)
    return failed
