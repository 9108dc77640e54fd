"""Progress of model downloads: a rich bar per model on a terminal, plain lines in CI logs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from rich.console import Console


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Reporter(Protocol):
    def start(self, model_id: str, total_bytes: int, detail: str) -> None: ...
    def update(self, model_id: str, done_bytes: int) -> None: ...
    def finish(self, model_id: str, summary: str, ok: bool) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    def start(self, model_id: str, total_bytes: int, detail: str) -> None: ...
    def update(self, model_id: str, done_bytes: int) -> None: ...
    def finish(self, model_id: str, summary: str, ok: bool) -> None: ...
    def close(self) -> None: ...


class LineReporter:
    """One line at start, one every ``every_s`` seconds per model, one at the end (CI logs)."""

    def __init__(self, console: Console, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.console, self.every_s, self.clock = console, every_s, clock
        self._state: dict[str, tuple[int, float, float]] = {}  # total, started, last printed
        self._lock = threading.Lock()

    def start(self, model_id: str, total_bytes: int, detail: str) -> None:
        now = self.clock()
        with self._lock:
            self._state[model_id] = (total_bytes, now, now)
        self.console.print(f"{model_id}: downloading {human_bytes(total_bytes)} ({detail})", soft_wrap=True)

    def update(self, model_id: str, done_bytes: int) -> None:
        now = self.clock()
        with self._lock:
            if model_id not in self._state:
                return
            total, started, last = self._state[model_id]
            if now - last < self.every_s:
                return
            self._state[model_id] = (total, started, now)
        pct = 100 * done_bytes / total if total else 100
        rate = done_bytes / max(now - started, 1e-6)
        self.console.print(f"{model_id}: {pct:3.0f}% {human_bytes(done_bytes)} / "
                           f"{human_bytes(total)}, {human_bytes(rate)}/s", soft_wrap=True)

    def finish(self, model_id: str, summary: str, ok: bool) -> None:
        with self._lock:
            self._state.pop(model_id, None)
        self.console.print(f"{model_id}: {summary}", soft_wrap=True)

    def close(self) -> None: ...


class RichReporter:
    """A bar per model, for a person at a terminal."""

    def __init__(self, console: Console):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                                 transient=False)
        self.tasks: dict[str, int] = {}
        self._lock = threading.Lock()
        self.progress.start()

    def start(self, model_id: str, total_bytes: int, detail: str) -> None:
        with self._lock:
            self.tasks[model_id] = self.progress.add_task(model_id, total=total_bytes or 1)

    def update(self, model_id: str, done_bytes: int) -> None:
        task = self.tasks.get(model_id)
        if task is not None:
            self.progress.update(task, completed=done_bytes)

    def finish(self, model_id: str, summary: str, ok: bool) -> None:
        task = self.tasks.get(model_id)
        if task is not None:
            total = self.progress.tasks[task].total if ok else None
            self.progress.update(task, completed=total,
                                 description=f"{model_id} [{'green' if ok else 'red'}]"
                                             f"{'done' if ok else 'failed'}[/]")
        self.progress.console.print(f"{model_id}: {summary}")

    def close(self) -> None:
        self.progress.stop()


def default_reporter() -> Reporter:
    from pyalbert.ui import console_err, interactive

    return RichReporter(console_err) if interactive() else LineReporter(console_err)
