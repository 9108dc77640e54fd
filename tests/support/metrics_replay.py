"""A stand-in vLLM server that replays a real vLLM 0.32 /metrics (``tests/fixtures/vllm``).

Every family, label and bucket is the real server's. Counters and histograms move on at the rate
the real server showed under traffic: scrape ``k`` serves ``idle + k * (after - idle)``, so
``rate()`` and ``histogram_quantile`` have something to chew on for as long as the test runs
(no window to race). Gauges are the real server's after traffic. ``/v1/models`` lists the model
(the gateway's probe), ``/v1/chat/completions`` answers in vLLM's shape with a usage block (the
gateway charges the tokens to the key).

    python -m tests.support.metrics_replay --port 18001 --model smollm2
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"
IDLE = FIXTURES / "metrics-0.32-idle.txt"
AFTER = FIXTURES / "metrics-0.32-after-traffic.txt"


def _series(line: str) -> tuple[str, float]:
    key, _, value = line.rpartition(" ")
    return key, float(value)


def _types(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            out[name] = kind
    return out


def _family(key: str, types: dict[str, str]) -> str:
    name = key.split("{", 1)[0]
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if name.endswith(suffix) and name[: -len(suffix)] in types:
            return name[: -len(suffix)]
    return name


def exposition(k: int, idle: str | None = None, after: str | None = None) -> str:
    """Scrape ``k`` (0, 1, 2, ...): cumulative series grown k times the real traffic's growth."""
    idle = IDLE.read_text() if idle is None else idle
    after = AFTER.read_text() if after is None else after
    types = _types(after)
    before = dict(_series(line) for line in idle.splitlines() if line and not line.startswith("#"))
    out = []
    for line in after.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
            continue
        key, value = _series(line)
        kind = types.get(_family(key, types), "untyped")
        if kind in ("counter", "histogram") and not key.split("{", 1)[0].endswith("_created"):
            start = before.get(key, 0.0)
            value = start + k * (value - start)
        out.append(f"{key} {value!r}")
    return "\n".join(out) + "\n"


def chat_answer(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-replay", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 21, "total_tokens": 24, "completion_tokens": 3},
    }).encode()


class Replay(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, model: str):
        super().__init__(address, Handler)
        self.model = model
        self.scrapes = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Replay
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/metrics":
            with self.server.lock:
                k = self.server.scrapes
                self.server.scrapes += 1
            self._send(200, exposition(k).encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif self.path == "/health":
            self._send(200, b"")
        elif self.path == "/v1/models":
            card = {"id": self.server.model, "object": "model", "created": 0, "owned_by": "vllm",
                    "max_model_len": 2048}
            self._send(200, json.dumps({"object": "list", "data": [card]}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        if self.path in ("/v1/chat/completions", "/v1/completions"):
            self._send(200, chat_answer(self.server.model))
        else:
            self._send(404, b'{"error": "not found"}')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    server = Replay((args.host, args.port), args.model)
    print(f"replay: listening on {args.host}:{args.port}", flush=True)
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
