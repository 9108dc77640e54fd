"""Client traffic during a change: counts answers and errors (the zero-loss redeploy checks)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx


@dataclass
class Load:
    ok: int = 0
    errors: list[object] = field(default_factory=list)


@contextlib.contextmanager
def chat_load(base_url: str, model: str, clients: int = 3) -> Iterator[Load]:
    """``clients`` threads posting chats (a new connection each) until the block ends."""
    load, stop, lock = Load(), threading.Event(), threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{base_url}/v1/chat/completions",
                               json={"model": model, "messages": [{"role": "user", "content": "x"}]},
                               headers={"Connection": "close"})
                    outcome: object = None if r.status_code == 200 else r.status_code
                except httpx.HTTPError as exc:
                    outcome = repr(exc)
                with lock:
                    if outcome is None:
                        load.ok += 1
                    else:
                        load.errors.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield load
    finally:
        stop.set()
        for t in threads:
            t.join(30)
