"""Client traffic during a change: counts answers and errors (the zero-loss redeploy checks)."""

from __future__ import annotations

import contextlib
import threading
import time
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

    def client(_: int) -> None:
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

    with running(client, clients, stop):
        yield load


@dataclass
class OpenAILoad:
    """What clients of the openai library saw: answers, and each failure as (status, Retry-After)."""

    ok: int = 0
    streamed: int = 0
    failures: list[tuple[object, str | None]] = field(default_factory=list)
    #: when each answer ended (time.monotonic): the longest gap between two is the outage
    answered_at: list[float] = field(default_factory=list)
    #: when each answered request was sent, and when each failure came (time.monotonic)
    sent_at: list[float] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)


@contextlib.contextmanager
def openai_load(base_url: str, model: str, clients: int = 4) -> Iterator[OpenAILoad]:
    """``clients`` threads of the openai client (no retries): even ones stream, odd ones not."""
    import openai

    load, stop, lock = OpenAILoad(), threading.Event(), threading.Lock()

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "one two three four five six"}]
        while not stop.is_set():
            outcome: tuple[object, str | None] | None = None
            sent = time.monotonic()
            try:
                if i % 2 == 0:
                    chunks = list(c.chat.completions.create(model=model, messages=messages,
                                                            stream=True))
                    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                    if "six" not in text:
                        outcome = ("cut stream", text)
                else:
                    answer = c.chat.completions.create(model=model, messages=messages)
                    if "six" not in (answer.choices[0].message.content or ""):
                        outcome = ("bad answer", None)
            except openai.APIStatusError as exc:
                outcome = (exc.status_code, exc.response.headers.get("retry-after"))
            except openai.APIError as exc:
                outcome = (type(exc).__name__, None)
            with lock:
                if outcome is None:
                    load.ok += 1
                    load.streamed += i % 2 == 0
                    load.answered_at.append(time.monotonic())
                    load.sent_at.append(sent)
                else:
                    load.failures.append(outcome)
                    load.failed_at.append(time.monotonic())
                    stop.wait(0.05)  # a client told to retry does not spin

    with running(client, clients, stop):
        yield load


@contextlib.contextmanager
def running(client, clients: int, stop: threading.Event) -> Iterator[None]:
    """``client(i)`` in ``clients`` threads until the block ends (then ``stop`` is set)."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(60)
