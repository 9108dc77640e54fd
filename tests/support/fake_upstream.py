"""A fast fake OpenAI (vLLM-like) upstream: raw asyncio + httptools on 127.0.0.1.

Behaviour is set on the instance between requests (``fake.latency = 0.5``, ``fake.status = 503``,
...) and read per request; what it received is in ``fake.requests`` (path + parsed JSON body).
It runs in a thread of its own (``with FakeUpstream() as fake: fake.url``) or as a process for
the benchmark (``python -m tests.support.fake_upstream --port 9000``).

Behaviours: ``latency`` before the response head; streamed answers of ``chunks`` SSE events
(``chunk_delay`` apart) or the words of ``reply``; ``status`` 503 (vLLM's "loading" answer) or
500; ``close_after`` chunks then drop the connection (a replica dying mid-stream);
``refuse()``/``accept()`` stop/restart listening (connection refused); embeddings; ``/v1/models``
and ``/health`` like vLLM. Answers of any size and shape: ``raw_body`` (a plain answer of exactly
these bytes) or ``raw_events`` (a streamed answer of these SSE events), sent with ``framing``
``"length"`` (Content-Length) or ``"chunked"`` (default: plain answers with Content-Length, streams
chunked, as vLLM does), plain answers in ``pieces`` writes ``piece_delay`` apart (a slow upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time

import httptools
import orjson

JSON_HEAD = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
CHUNKED_JSON_HEAD = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
SSE_LENGTH_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                   b"content-length: %d\r\n\r\n")
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error",
           503: b"Service Unavailable"}


class FakeUpstream:
    def __init__(self, *, models: tuple[str, ...] | None = None, port: int = 0):
        #: models served; None answers any model (and lists ``["fake"]``)
        self.models = models
        self.port = port
        self.latency = 0.0
        self.chunks = 5
        self.chunk_delay = 0.0
        self.reply: str | None = None
        self.status = 200
        self.close_after: int | None = None
        self.raw_body: bytes | None = None
        self.raw_events: list[bytes] | None = None
        self.framing: str | None = None
        self.pieces = 1
        self.piece_delay = 0.0
        self.requests: list[tuple[str, dict | None]] = []
        self.record = True
        self.in_flight = 0
        self.aborted = 0  # clients that closed before the answer was complete
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.latency = self.chunk_delay = 0.0
        self.chunks, self.reply, self.status, self.close_after = 5, None, 200, None
        self.raw_body, self.raw_events, self.framing, self.pieces = None, None, None, 1
        self.piece_delay = 0.0
        self.requests.clear()
        self.aborted = 0

    # -- life cycle ------------------------------------------------------------------------
    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Conn(self), "127.0.0.1", self.port, reuse_address=True, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def start(self) -> FakeUpstream:
        ready = threading.Event()

        def run() -> None:
            import uvloop

            loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("the fake upstream did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self._thread = None

    def _call(self, coro_fn) -> None:
        asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(5)

    def refuse(self) -> None:
        """Stop listening: new connections are refused (open ones are closed too)."""
        async def down() -> None:
            await self.close()
            for conn in list(_Conn.live.get(id(self), ())):
                conn.transport.abort()

        self._call(down)

    def drop_connections(self) -> None:
        """Close every open connection, keep listening (call from the fake's loop)."""
        for conn in list(_Conn.live.get(id(self), ())):
            conn.transport.close()

    def accept(self) -> None:
        self._call(self.serve)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answers ---------------------------------------------------------------------------
    def answer(self, path: str, body: dict | None) -> tuple[int, bytes] | None:
        """(status, JSON body) for a plain answer; None means: stream it."""
        if path == "/health":
            return 200, b""
        if path == "/v1/models":
            ids = self.models or ("fake",)
            return 200, orjson.dumps({"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "vllm", "max_model_len": 2048} for m in ids]})
        if body is None:
            return 400, _error("body must be JSON", "BadRequestError")
        model = body.get("model", "")
        if self.models is not None and model not in self.models:
            return 404, _error(f"The model `{model}` does not exist.", "NotFoundError")
        if self.status == 503:
            return 503, _error("model is loading", "ServiceUnavailableError")
        if self.status >= 400:
            return self.status, _error("internal failure", "InternalServerError")
        if body.get("stream") and self.raw_events is not None:
            return None
        if self.raw_body is not None:
            return 200, self.raw_body
        if path == "/v1/embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            return 200, orjson.dumps({"object": "list", "model": model, "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, float(i)]}
                for i in range(count)], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        if body.get("stream"):
            return None
        text = self.reply if self.reply is not None else "".join(self.words())
        if path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": "stop"}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            kind = "text_completion"
        return 200, orjson.dumps({
            "id": "cmpl-fake", "object": kind, "created": 1, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": self.chunks,
                      "total_tokens": 7 + self.chunks}})

    def words(self) -> list[str]:
        if self.reply is not None:
            return [w + " " for w in self.reply.split(" ")[:-1]] + [self.reply.split(" ")[-1]]
        return [f"word{chr(97 + i % 26)} " for i in range(self.chunks)]

    def events(self, path: str, body: dict) -> list[bytes]:
        if self.raw_events is not None:
            return list(self.raw_events)
        model = body.get("model", "")
        chat = path == "/v1/chat/completions"
        kind = b"chat.completion.chunk" if chat else b"text_completion"
        head = b'{"id":"cmpl-fake","object":"%s","created":1,"model":%s,"choices":[' % (
            kind, orjson.dumps(model))
        out = []
        if chat:
            out.append(head + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}')
        for word in self.words():
            piece = orjson.dumps(word)
            if chat:
                out.append(head + b'{"index":0,"delta":{"content":%s},"finish_reason":null}]}' % piece)
            else:
                out.append(head + b'{"index":0,"text":%s,"finish_reason":null}]}' % piece)
        if chat:
            out.append(head + b'{"index":0,"delta":{},"finish_reason":"stop"}]}')
        else:
            out.append(head + b'{"index":0,"text":"","finish_reason":"stop"}]}')
        return [b"data: " + e + b"\n\n" for e in out] + [b"data: [DONE]\n\n"]


def _error(message: str, kind: str) -> bytes:
    return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None,
                         "code": None})


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Conn(asyncio.Protocol):
    live: dict[int, set[_Conn]] = {}

    def __init__(self, fake: FakeUpstream):
        self.fake = fake
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _Conn.live.setdefault(id(self.fake), set()).add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        _Conn.live.get(id(self.fake), set()).discard(self)
        if self.task is not None and not self.task.done():
            self.fake.aborted += 1
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.decode().split("?")[0]
        raw = b"".join(self.body)
        self.url, self.body = b"", []
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        fake = self.fake
        if fake.record and path not in ("/v1/models", "/health"):
            fake.requests.append((path, body))
        if fake.latency == 0 and fake.close_after is None and fake.pieces == 1:
            result = fake.answer(path, body)
            if result is not None:
                self._plain(*result)
                return
        self.task = asyncio.get_running_loop().create_task(self._slow(path, body))

    def _plain(self, status: int, payload: bytes) -> None:
        reason = REASONS.get(status, b"X")
        if self.fake.framing == "chunked":
            self.transport.write(CHUNKED_JSON_HEAD % (status, reason)
                                 + (_frame(payload) if payload else b"") + b"0\r\n\r\n")
        else:
            self.transport.write(JSON_HEAD % (status, reason, len(payload)) + payload)

    async def _plain_in_pieces(self, status: int, payload: bytes) -> None:
        """The answer written in ``fake.pieces`` parts, ``fake.piece_delay`` apart."""
        fake = self.fake
        reason = REASONS.get(status, b"X")
        chunked = fake.framing == "chunked"
        size = -(-len(payload) // fake.pieces) or 1
        parts = [payload[i:i + size] for i in range(0, len(payload), size)]
        self.transport.write(CHUNKED_JSON_HEAD % (status, reason) if chunked
                             else JSON_HEAD % (status, reason, len(payload)))
        for part in parts:
            await asyncio.sleep(fake.piece_delay)
            self.transport.write(_frame(part) if chunked else part)
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    async def _slow(self, path: str, body: dict | None) -> None:
        fake = self.fake
        fake.in_flight += 1
        try:
            if fake.latency:
                await asyncio.sleep(fake.latency)
            result = fake.answer(path, body)
            if result is not None:
                if fake.pieces > 1:
                    await self._plain_in_pieces(*result)
                else:
                    self._plain(*result)
                return
            events = fake.events(path, body or {})
            if fake.framing == "length" and fake.close_after is None:
                self.transport.write(SSE_LENGTH_HEAD % sum(len(e) for e in events))
                for event in events:
                    self.transport.write(event)
                    if fake.chunk_delay:
                        await asyncio.sleep(fake.chunk_delay)
                return
            if fake.chunk_delay == 0 and fake.close_after is None:
                self.transport.write(SSE_HEAD + b"".join(_frame(e) for e in events) + b"0\r\n\r\n")
                return
            self.transport.write(SSE_HEAD)
            for i, event in enumerate(events):
                if fake.close_after is not None and i >= fake.close_after:
                    self.transport.abort()
                    return
                self.transport.write(_frame(event))
                if fake.chunk_delay:
                    await asyncio.sleep(fake.chunk_delay)
            self.transport.write(b"0\r\n\r\n")
        finally:
            fake.in_flight -= 1
            self.task = None


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake OpenAI upstream for the gateway benchmark")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=5)
    args = parser.parse_args()
    fake = FakeUpstream(port=args.port)
    fake.chunks = args.chunks
    fake.record = False
    import uvloop

    async def run() -> None:
        await fake.serve()
        print(f"fake upstream on {fake.url}", flush=True)
        while True:
            await asyncio.sleep(3600)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run())


if __name__ == "__main__":
    main()


class GatewayServer:
    """An ASGI app (the gateway) served by uvicorn in a thread on 127.0.0.1, random port, with
    the protocol the gateway runs with in production (head cap, read deadline)."""

    def __init__(self, app):
        import uvicorn

        from pyalbert.api.http_guard import PROTOCOL

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, http=PROTOCOL, loop="uvloop",
                                lifespan="on", access_log=False, log_level="warning",
                                proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def __enter__(self) -> GatewayServer:
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self, wait: bool = True) -> None:
        """Ask uvicorn to exit (it notices within 0.1 s); ``wait`` for the thread to end."""
        self.server.should_exit = True
        if wait and self.thread is not None:
            self.thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
