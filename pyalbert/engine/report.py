"""What the engine tells the terminal: per-host prefixed lines, results, summaries."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from pyalbert.errors import AlbertError
from pyalbert.ui import console


@dataclass
class HostResult:
    host: str
    status: str = "pending"  # deployed | unchanged | failed | rolled back | ...
    release: str = ""
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    #: vLLM server -> ("warm" | "cold", seconds until ready) of the starts this run made
    starts: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: what the run learnt after the host's deploy (the front door's ACME certificate)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("deployed", "unchanged", "rolled back to", "done", "ready")


class Printer:
    """Per-host prefixed lines, safe from several threads."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._lock = threading.Lock()

    def __call__(self, host: str, text: str, style: str = "") -> None:
        if self.quiet:
            return
        with self._lock:
            line = f"[bold cyan]\\[{host}][/] " + (f"[{style}]{text}[/]" if style else text)
            console.print(line, highlight=False, soft_wrap=True)


def interrupted_text(results: Sequence[HostResult]) -> str:
    """One paragraph: where each host ended after Ctrl-C."""
    parts = []
    for r in results:
        if r.status in ("interrupted", "rolled back"):
            parts.append(f"{r.host} went back to its previous release")
        elif r.ok:
            parts.append(f"{r.host} had finished ({r.status})")
        else:
            parts.append(f"{r.host} {r.status}" + (f": {r.error.splitlines()[0]}" if r.error else ""))
    return ("interrupted (Ctrl-C): " + ("; ".join(parts) or "no host had started")
            + ". The deploy locks were released.")


def summary_table(results: Sequence[HostResult], title: str = "deploy") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("host", "result", "release", "changed", "time"):
        table.add_column(col)
    for r in results:
        style = "green" if r.ok else "red"
        table.add_row(r.host, f"[{style}]{r.status}[/]", r.release,
                      ", ".join(r.changed) or "-", f"{r.seconds:.1f}s")
    return table


def finish(results: Sequence[HostResult], title: str, out: Printer) -> list[HostResult]:
    """Print errors and the summary; raise when a host failed."""
    for r in results:
        if r.error:
            out(r.host, r.error, "red")
    if not out.quiet:
        console.print(summary_table(results, title))
    failed = [r for r in results if not r.ok]
    if failed:
        raise AlbertError(f"{title} failed on {len(failed)} of {len(results)} host(s): "
                          + ", ".join(f"{r.host} ({r.status})" for r in failed)
                          + (". Some hosts serve NEITHER release: see 'NOT serving' below.\n"
                             if any("NOT serving" in r.error for r in failed) else
                             ". The hosts listed kept (or went back to) their previous release.\n")
                          + "\n".join(r.error.splitlines()[0] for r in failed if r.error))
    return list(results)


def print_summary(outcomes: Sequence, what: str) -> int:
    """One line per host of a fan-out (provision, setup); returns the number of failed hosts."""
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
