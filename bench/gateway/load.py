"""The load tool of the gateway benchmark: closed-loop HTTP/1.1 keep-alive clients on uvloop.

``python bench/gateway/load.py --url http://127.0.0.1:9000 -c 64 --duration 5 [--stream]``
(``https://`` with ``--cafile``: TLS keep-alive connections, the handshake before the warm-up)
prints one JSON object: requests, errors, seconds, req/s, p50/p90/p99 latency (ms), SSE chunks.
Every connection sends a request, waits for the whole response, sends the next. Latency runs
from the write to the end of the response (for streams: to the last chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _task_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in ns (the scheduler's own sum: no 10 ms tick rounding)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def cpu_seconds(pids: list[int] | None) -> float:
    """CPU of ``pids`` and their descendants (0 without a pid): every thread's run time from
    ``/proc/<pid>/task/<tid>/schedstat`` (ns), user and system alike."""
    if not pids:
        return 0.0
    return sum(_task_ns(p) for p in {t for pid in pids for t in _tree(pid)}) / 1e9


class Client(asyncio.Protocol):
    def __init__(self, bench: Bench):
        self.bench = bench
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0
        self.events = 0
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.bench.stopping:
            self.bench.errors += 1
            self.bench.lost += 1

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.events += body.count(b"data: ")

    def on_message_complete(self) -> None:
        bench = self.bench
        now = time.perf_counter()
        if self.parser.get_status_code() != 200:
            bench.errors += 1
        if bench.recording:
            bench.latencies.append(now - self.sent)
            bench.chunks += max(0, self.events - 1)  # minus "data: [DONE]"
        self.events = 0
        if not bench.stopping:
            self.send()

    def send(self) -> None:
        self.sent = time.perf_counter()
        self.transport.write(self.bench.request)


class Bench:
    def __init__(self, request: bytes):
        self.request = request
        self.latencies: list[float] = []
        self.chunks = 0
        self.errors = 0
        self.lost = 0
        self.recording = False
        self.stopping = False


def request_bytes(url: str, model: str, stream: bool, key: str | None) -> bytes:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "stream": stream, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    return (b"POST %s/v1/chat/completions HTTP/1.1\r\nHost: %s\r\n%sContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (parts.path.rstrip("/").encode(),
                                                 parts.netloc.encode(), auth, len(body), body))


async def run(url: str, concurrency: int, duration: float, warmup: float, stream: bool,
              model: str, key: str | None, cpu_pid: list[int] | None = None,
              cafile: str | None = None) -> dict:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    tls = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
    bench = Bench(request_bytes(url, model, stream, key))
    clients = []
    for _ in range(concurrency):
        _, client = await loop.create_connection(lambda: Client(bench), parts.hostname, parts.port,
                                                  ssl=tls)
        clients.append(client)
    for client in clients:
        client.send()
    await asyncio.sleep(warmup)
    bench.recording = True
    pids = cpu_pid or []
    each0 = [cpu_seconds([p]) for p in pids]
    start = time.perf_counter()
    await asyncio.sleep(duration)
    bench.recording = False
    seconds = time.perf_counter() - start
    each = [cpu_seconds([p]) - c0 for p, c0 in zip(pids, each0, strict=True)]
    cpu = sum(each)
    bench.stopping = True
    for client in clients:
        client.transport.close()
    lat = sorted(bench.latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else float("nan")

    return {"requests": len(lat), "errors": bench.errors, "seconds": round(seconds, 3),
            "rps": round(len(lat) / seconds, 1), "p50_ms": pct(0.5), "p90_ms": pct(0.9),
            "p99_ms": pct(0.99), "chunks": bench.chunks,
            "chunks_per_s": round(bench.chunks / seconds, 1),
            "cpu_ms_per_req": round(cpu * 1000 / len(lat), 3) if lat and cpu_pid else None,
            # each pid's own share (a proxy and its gateway, measured over the same requests)
            "cpu_ms_per_req_each": [round(c * 1000 / len(lat), 3) for c in each] if lat else []}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--key", default=None)
    parser.add_argument("--cpu-pid", type=int, action="append", default=None,
                        help="server pid whose CPU to count (repeat: a proxy and its gateway)")
    parser.add_argument("--cafile", default=None, help="CA to trust for an https:// url")
    args = parser.parse_args()
    result = uvloop.run(run(args.url, args.concurrency, args.duration, args.warmup, args.stream,
                            args.model, args.key, args.cpu_pid, args.cafile))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
