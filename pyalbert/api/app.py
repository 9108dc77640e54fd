"""The gateway: a raw ASGI application (no framework: every microsecond is on the request path).

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (proxied),
``GET /v1/models``, ``/health``, ``/ready``, ``/metrics``. See :mod:`pyalbert.api` for the rules.
"""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import time
from pathlib import Path
from typing import Any

import orjson

from pyalbert.api import admission, backends_reload
from pyalbert.api import errors as E
from pyalbert.api.accesslog import AccessLog
from pyalbert.api.answers import Answers
from pyalbert.api.errors import ApiError
from pyalbert.api.http_guard import HttpLimits
from pyalbert.api.keys import Key, KeyStore
from pyalbert.api.metrics import Metrics
from pyalbert.api.routing import Replica, Router
from pyalbert.api.settings import GatewaySettings
from pyalbert.api.upstream import (
    ConnectFailed,
    Response,
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
)
from pyalbert.errors import AlbertError

#: path -> (route name, post-processed as chat?, kind of answer)
PROXIED = {
    "/v1/chat/completions": ("chat", True),
    "/v1/completions": ("completions", False),
    "/v1/embeddings": ("embeddings", None),
}
TOTAL_TOKENS_RE = re.compile(rb'"total_tokens"\s*:\s*(\d+)')
JSON = b"application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


class ClientGone(Exception):
    """The client went away before its request was read."""


class Ctx:
    """What one request's access-log line says."""

    __slots__ = ("model", "key", "replica", "retries", "stream", "tokens", "error", "ttfb",
                 "finished", "task", "gone", "start", "reserved", "charge", "prompt", "events",
                 "usage")

    def __init__(self) -> None:
        self.model = ""
        self.key = ""
        self.replica: Replica | None = None
        self.retries = 0
        self.stream = False
        self.tokens = 0
        self.error = ""
        self.ttfb = 0.0
        self.finished = False
        self.task: asyncio.Task | None = None
        self.gone = False
        self.start = 0.0
        #: tokens reserved at admission; what to charge in the end (None: unknown, keep them)
        self.reserved = 0
        self.charge: int | None = None
        self.prompt = 0
        #: SSE events relayed and the usage seen (-1: not a relayed stream)
        self.events = -1
        self.usage = 0


def client_address(scope: dict) -> str | None:
    """The client as the front door saw it. HAProxy overwrites X-Forwarded-For with the address
    it accepted and reaches the gateway over its unix socket (``--uds``, mode 0600): a connection
    there has no peer address (``client`` is None) and its X-Forwarded-For is trusted. On the TCP
    port the peer is the client itself: its X-Forwarded-For is never read."""
    client = scope.get("client")
    if client:
        return client[0]
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            return value.decode("latin-1").rsplit(",", 1)[-1].strip() or None
    return None


class Gateway:
    """``Gateway(settings)`` is the ASGI app; ``reload()`` re-reads keys and whitelist."""

    def __init__(self, settings: GatewaySettings, *, keys: KeyStore | None = None,
                 answers: Answers | None = None, log_stream: Any = None):
        self.settings = settings
        self.router = Router(settings.backends, connect_timeout=settings.connect_timeout_s,
                             probe_interval=settings.probe_interval_s,
                             api_key=self._upstream_key())
        self.keys = keys if keys is not None else self._load_keys()
        self.answers = answers if answers is not None else self._load_answers()
        self.metrics = Metrics()
        self.log = AccessLog(log_stream, enabled=settings.access_log)
        self._flusher: asyncio.TimerHandle | None = None
        self._signal = False
        self.watcher = backends_reload.watcher_for(settings, self.router, self._log_event)
        self._set_headers()

    @property
    def http_limits(self) -> HttpLimits:
        """Read by the server's protocol (:mod:`pyalbert.api.http_guard`) for each connection."""
        return HttpLimits(self.settings.max_header_bytes, self.settings.read_timeout_s)

    def _upstream_key(self) -> str | None:
        """The model servers' key (``--upstream-key FILE``), sent as their Bearer token."""
        path = self.settings.upstream_key_path
        if not path:
            return None
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AlbertError(f"the upstream key file {path!r} cannot be read ({exc.strerror}). "
                              "Fix: redeploy (the deploy writes it 0600 in the release) or pass "
                              "--upstream-key with a readable file.") from None
        if not key or any(c in key for c in "\r\n"):
            raise AlbertError(f"the upstream key file {path!r} must hold one key on one line. "
                              "Fix: redeploy, or write the key alone in the file.")
        return key

    # -- configuration that can be reloaded ------------------------------------------------
    def _load_keys(self) -> KeyStore:
        s = self.settings
        if s.open_access:
            return KeyStore(open_access=True)
        if not s.keys_path:
            raise AlbertError(
                "the gateway has no API keys: set $ALBERT_API_KEYS (the api_keys secret) or pass "
                "--keys FILE with a keys file (store keys with `albert api hash-key`), or pass "
                "--no-auth to run without authentication (laptops and tests only).")
        return KeyStore.load(Path(s.keys_path), workers=s.workers)

    def _load_answers(self) -> Answers:
        s = self.settings
        path = Path(s.whitelist_path) if s.whitelist_path else None
        return Answers.load(s.whitelist_mode, path)

    def _set_headers(self) -> None:
        wl = (b"x-albert-whitelist", self.answers.header)
        self.json_headers = [(b"content-type", JSON), wl]
        self.sse_headers = [*SSE_HEADERS, wl]
        self.wl_header = wl

    def _log_event(self, record: dict) -> None:
        self.log.write({"ts": time.time(), **record})
        self.log.flush()

    def reload(self) -> bool:
        """Re-read the keys file and the whitelist; keep the old ones if either is broken."""
        try:
            keys = self._load_keys()
            answers = self._load_answers()
        except AlbertError as exc:
            self.metrics.reload_failures += 1
            self.log.write({"ts": time.time(), "event": "reload_failed", "error": str(exc)})
            self.log.flush()
            return False
        keys.carry_state_from(self.keys)
        self.keys, self.answers = keys, answers
        self._set_headers()
        self.metrics.reloads += 1
        self.log.write({"ts": time.time(), "event": "reloaded", "keys": len(keys),
                        "whitelist_mode": answers.mode, "whitelist_version": answers.version,
                        "whitelist_entries": len(answers.whitelist or ())})
        self.log.flush()
        return True

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        gc.collect()
        gc.freeze()  # long-lived objects (modules, config) leave the collector's generations
        self.router.start()
        if self.watcher is not None:
            self.watcher.start()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self._signal = True
        except (ValueError, RuntimeError, NotImplementedError):
            self._signal = False  # not the main thread (tests)
        self._tick()
        self.log.write({"ts": time.time(), "event": "started", "env": self.settings.env,
                        "models": sorted(self.router.models), "keys": len(self.keys),
                        "auth": not self.keys.open_access, "whitelist": self.answers.header.decode()})

    def _tick(self) -> None:
        self.log.flush()
        self._flusher = asyncio.get_running_loop().call_later(1.0, self._tick)

    async def shutdown(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.watcher is not None:
            await self.watcher.stop()
        await self.router.stop()
        self.log.flush()

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        start = time.perf_counter()
        path = scope["path"]
        ctx = Ctx()
        ctx.start = start
        route = PROXIED.get(path)
        # a metrics label: never the raw path (label injection, unbounded series)
        name = route[0] if route else path if path in LOCAL_ROUTES else "other"
        self.metrics.in_flight += 1
        try:
            if route is not None:
                if scope["method"] != "POST":
                    raise ApiError(405, f"{path} takes POST", "invalid_request_error", "method_not_allowed")
                status = await self.proxy(scope, receive, send, ctx, path, route[0], route[1])
            else:
                status = await self.local(scope, send, path, ctx)
        except ApiError as exc:
            status = exc.status
            ctx.error = exc.code or exc.type
            self.metrics.reject(ctx.key, status, ctx.error)
            await self.respond(send, status, exc.body(), exc.headers)
        except ClientGone:
            status, ctx.error = 499, "client_disconnected"
        except asyncio.CancelledError:
            task = ctx.task
            if not ctx.gone or task is None or not hasattr(task, "uncancel"):
                raise
            task.uncancel()  # our own disconnect watcher cancelled us: the client is gone
            status, ctx.error = 499, "client_disconnected"
        finally:
            self.metrics.in_flight -= 1
        elapsed = time.perf_counter() - start
        self.metrics.observe(name, ctx.model, status, elapsed)
        if self.log.enabled:
            record = {"ts": round(time.time(), 3), "method": scope["method"], "path": path,
                      "status": status, "ms": round(elapsed * 1000, 2), "client": client_address(scope)}
            if ctx.model:
                record.update(model=ctx.model, key=ctx.key, stream=ctx.stream, tokens=ctx.tokens,
                              replica=ctx.replica.url if ctx.replica else None, retries=ctx.retries,
                              ttfb_ms=round(ctx.ttfb * 1000, 2))
            if ctx.error:
                record["error"] = ctx.error
            self.log.write(record)

    async def respond(self, send: Any, status: int, body: bytes,
                      extra: list[tuple[bytes, bytes]] | None = None,
                      content_type: bytes = JSON) -> None:
        headers = [(b"content-type", content_type), self.wl_header,
                   (b"content-length", str(len(body)).encode())]
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- local routes ----------------------------------------------------------------------
    async def local(self, scope: dict, send: Any, path: str, ctx: Ctx) -> int:
        method = scope["method"]
        if path not in LOCAL_ROUTES:
            raise E.not_found(f"no route {method} {path}; this is an OpenAI-compatible API under /v1")
        if method not in ("GET", "HEAD"):
            raise ApiError(405, f"{path} takes GET", "invalid_request_error", "method_not_allowed")
        if path == "/health":
            await self.respond(send, 200, b'{"status":"ok"}')
            return 200
        if path == "/ready":
            ok, counts = self.router.ready()
            status = 200 if ok else 503
            await self.respond(send, status, orjson.dumps(
                {"status": "ready" if ok else "not ready", "healthy_replicas": counts}))
            return status
        if path == "/metrics":
            if self.settings.metrics_auth:
                key = self.authenticate(scope)
                ctx.key = key.name
                if not (key.scrape or self.keys.open_access):
                    raise ApiError(403, "this API key may not read /metrics: use a key with "
                                   "'scrape: true' in the keys file (api.metrics_auth is on)",
                                   "permission_error", "metrics_not_allowed")
            body = self.metrics.render(self.router, len(self.answers.whitelist or ()))
            await self.respond(send, 200, body, content_type=b"text/plain; version=0.0.4")
            return 200
        # /v1/models
        key = self.authenticate(scope)
        ctx.key = key.name
        data = []
        for model in self.router.healthy_models():
            if not key.allows(model):
                continue
            card = {"id": model, "object": "model", "created": 0, "owned_by": "albert"}
            upstream = next((r.card for r in self.router.models[model] if r.card), None)
            if upstream:
                card.update({k: v for k, v in upstream.items() if k not in ("id", "permission")})
            data.append(card)
        await self.respond(send, 200, orjson.dumps({"object": "list", "data": data}))
        return 200

    # -- authentication --------------------------------------------------------------------
    def authenticate(self, scope: dict) -> Key:
        keys = self.keys
        if keys.open_access:
            return keys.anonymous
        value = None
        for name, header in scope["headers"]:
            if name == b"authorization":
                value = header
                break
        if value is None:
            raise E.unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        if value[:7].lower() != b"bearer ":
            raise E.unauthorized("the Authorization header must be 'Bearer <key>'")
        key = keys.lookup(value[7:].strip())
        if key is None:
            raise E.unauthorized("invalid API key")
        return key

    # -- proxied routes --------------------------------------------------------------------
    async def read_body(self, scope: dict, receive: Any) -> bytes:
        limit = self.settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        raise E.too_large(limit)
                except ValueError:
                    raise E.bad_request("invalid Content-Length header") from None
                break
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise E.too_large(limit)
            return body
        parts, size = [body], len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise E.too_large(limit)
            parts.append(chunk)
            if not message.get("more_body"):
                return b"".join(parts)

    def parse(self, body: bytes) -> dict:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise E.bad_request(f"the request body is not valid JSON ({exc})", "invalid_json") from None
        if not isinstance(req, dict):
            raise E.bad_request("the request body must be a JSON object", "invalid_json")
        return req

    def cap_counts(self, req: dict, key: Key) -> bool:
        """Validate and cap max_tokens, max_completion_tokens, n (key's and environment's caps)."""
        s = self.settings
        return admission.apply_caps(req, admission.smaller(key.max_tokens, s.max_tokens_cap),
                                    admission.smaller(key.max_n, s.max_n_cap))

    def reserve(self, req: dict, key: Key, body: bytes, route: str, model: str) -> int:
        """Tokens this request reserves of the key's tokens per minute (0 without that limit)."""
        if key.tokens is None:
            return 0
        model_len = next((r.card.get("max_model_len") for r in self.router.models[model]
                          if r.card), None)
        return admission.reservation(req, len(body), route, model_len)

    def settle(self, key: Key, ctx: Ctx) -> None:
        """Charge the key what the request used (the reservation when unknown)."""
        if ctx.events >= 0:  # a stream, complete or cut: its usage, else what was relayed
            ctx.charge = ctx.usage or ctx.prompt + max(0, ctx.events - 2)
        used = ctx.charge if ctx.charge is not None else ctx.reserved
        if ctx.reserved or ctx.charge:
            key.settle(ctx.reserved, used)
        ctx.tokens = used
        if used:
            self.metrics.tokens[(key.name, ctx.model)] += used

    async def proxy(self, scope: dict, receive: Any, send: Any, ctx: Ctx, path: str,
                    route: str, chat: bool | None) -> int:
        key = self.authenticate(scope)
        ctx.key = key.name
        body = await self.read_body(scope, receive)
        req = self.parse(body)
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise E.bad_request("the request needs a 'model' (a string)", "missing_model", "model")
        replicas = self.router.models.get(model)
        if replicas is None:
            known = [m for m in self.router.models if key.allows(m)]
            raise E.not_found(f"model {model!r} does not exist; available models: "
                              f"{', '.join(known) or 'none'}", "model_not_found")
        ctx.model = model
        if not key.allows(model):
            raise E.forbidden(f"this API key may not use model {model!r}")
        if not replicas:  # out of rotation while it restarts (routes folder)
            wait = self.router.retry_after.get(model, 1)
            raise E.upstream_unavailable(f"model {model!r} is restarting; retry in {wait} s", wait)
        ctx.stream = stream = req.get("stream") is True
        if chat is not None and self.cap_counts(req, key):
            body = orjson.dumps(req)
        reserve = self.reserve(req, key, body, route, model)
        wait, which = key.admit(reserve)
        if wait:
            raise E.too_many(f"rate limit of this API key reached ({which}); retry in "
                             f"{max(1, int(wait + 0.999))} s", wait)
        ctx.reserved = reserve
        ctx.prompt = admission.prompt_estimate(len(body)) if reserve else 0

        ctx.task = asyncio.current_task()
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, ctx))
        try:
            try:
                replica, resp = await self.open_upstream(ctx, model, path.encode(), body)
            except ApiError as exc:
                if exc.status == 503:
                    ctx.charge = 0  # no replica ran it
                raise
            try:
                ctx.ttfb = time.perf_counter() - ctx.start
                if stream and resp.status == 200 and resp.headers.get(
                        b"content-type", b"").startswith(b"text/event-stream"):
                    return await self.relay_stream(send, ctx, key, replica, resp, chat)
                return await self.relay_plain(send, ctx, key, replica, resp, chat)
            finally:
                replica.outstanding -= 1
                resp.close()
        finally:
            ctx.finished = True
            if not watcher.done():
                watcher.cancel()
            self.settle(key, ctx)  # disconnects and cut streams too

    async def _watch_disconnect(self, receive: Any, ctx: Ctx) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not ctx.finished and ctx.task is not None:
            ctx.gone = True
            ctx.task.cancel()

    async def open_upstream(self, ctx: Ctx, model: str, path: bytes,
                            body: bytes) -> tuple[Replica, Response]:
        """Send to the best replica; retry once elsewhere on connect failure or 503."""
        s, router, metrics = self.settings, self.router, self.metrics
        replica = router.pick(model)
        for attempt in (0, 1):
            replica.outstanding += 1
            ctx.replica = replica
            try:
                resp = await replica.pool.request(b"POST", path, body,
                                                  first_byte_timeout=s.first_byte_timeout_s,
                                                  total_timeout=s.total_timeout_s)
            except ConnectFailed as exc:
                replica.outstanding -= 1
                metrics.upstream_errors[(model, "connect")] += 1
                router.eject(replica, str(exc))
                other = router.pick(model, exclude=replica)
                if attempt == 0 and other is not None:
                    metrics.retries += 1
                    ctx.retries += 1
                    replica = other
                    continue
                raise E.upstream_unavailable(f"model {model!r} is unavailable: {exc}") from None
            except UpstreamTimeout as exc:
                replica.outstanding -= 1
                metrics.upstream_errors[(model, "timeout")] += 1
                raise E.gateway_timeout(f"model {model!r}: {exc}") from None
            except UpstreamBroken as exc:
                replica.outstanding -= 1
                metrics.upstream_errors[(model, "broken")] += 1
                router.eject(replica, str(exc))
                raise E.bad_gateway(f"model {model!r}: {exc}") from None
            except BaseException:
                replica.outstanding -= 1
                raise
            status = resp.status
            if status < 500:
                return replica, resp
            metrics.upstream_errors[(model, f"http_{status}")] += 1
            router.eject(replica, f"answered HTTP {status}")
            if status == 503 and attempt == 0:
                other = router.pick(model, exclude=replica)
                if other is not None:
                    replica.outstanding -= 1
                    resp.close()
                    metrics.retries += 1
                    ctx.retries += 1
                    replica = other
                    continue
            return replica, resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def relay_plain(self, send: Any, ctx: Ctx, key: Key, replica: Replica, resp: Response,
                          chat: bool | None) -> int:
        try:
            body = await resp.read()
        except UpstreamTimeout as exc:
            self.metrics.upstream_errors[(ctx.model, "timeout")] += 1
            raise E.gateway_timeout(f"model {ctx.model!r}: {exc}") from None
        except UpstreamError as exc:
            self.metrics.upstream_errors[(ctx.model, "broken")] += 1
            self.router.eject(replica, str(exc))
            raise E.bad_gateway(f"model {ctx.model!r}: the replica failed mid-answer ({exc})") from None
        status = resp.status
        if status == 200:
            match = TOTAL_TOKENS_RE.search(body)
            if match:
                ctx.charge = int(match[1])
            if chat is not None and self.answers.active:
                new = self.answers.plain(body, chat)
                if new is not None:
                    body = new
        elif status >= 400:
            ctx.charge = 0  # refused: nothing generated
            body = openai_error_shape(body, status)
        content_type = resp.headers.get(b"content-type", JSON)
        ctx.finished = True
        await self.respond(send, status, body, content_type=content_type)
        return status

    async def relay_stream(self, send: Any, ctx: Ctx, key: Key, replica: Replica, resp: Response,
                           chat: bool | None) -> int:
        rewriter = self.answers.stream(bool(chat)) if chat is not None and self.answers.active else None
        await send({"type": "http.response.start", "status": 200, "headers": self.sse_headers})
        ctx.events = ctx.usage = 0  # counted as relayed: settle() charges a cut stream too
        error: UpstreamError | None = None
        while True:
            try:
                data = await resp.next_chunk()
            except UpstreamError as exc:
                error = exc
                break
            if data is None:
                break
            ctx.events += data.count(b"data:")
            if b'"total_tokens"' in data:
                match = TOTAL_TOKENS_RE.search(data)
                if match:
                    ctx.usage = int(match[1])
            if rewriter is not None:
                data = rewriter.feed(data)
                if not data:
                    continue
            await send({"type": "http.response.body", "body": data, "more_body": True})
        tail = b""
        if rewriter is not None:
            tail = rewriter.finish() if error is None else b""
        if error is not None:
            kind = "timeout" if isinstance(error, UpstreamTimeout) else "broken"
            self.metrics.upstream_errors[(ctx.model, kind)] += 1
            if kind == "broken":
                self.router.eject(replica, str(error))
            ctx.error = f"upstream_{kind}_mid_stream"
            tail += b"data: " + E.error_body(
                f"model {ctx.model!r}: the answer was interrupted ({error})", "server_error",
                "upstream_" + kind) + b"\n\n"
        ctx.finished = True
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return 200


def openai_error_shape(body: bytes, status: int) -> bytes:
    """vLLM's ``{"object": "error", "message", "type", ...}`` as OpenAI's ``{"error": {...}}``."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode(errors="replace").strip()[:500] or f"upstream answered HTTP {status}"
        return E.error_body(text, "server_error" if status >= 500 else "invalid_request_error")
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return body
    if isinstance(obj, dict) and "message" in obj:
        code = obj.get("code")
        return E.error_body(str(obj["message"]), str(obj.get("type") or "upstream_error"),
                            None if code is None else str(code), obj.get("param"))
    return E.error_body(f"upstream answered HTTP {status}", "server_error")


LOCAL_ROUTES = frozenset({"/health", "/ready", "/metrics", "/v1/models"})


def create_app(settings: GatewaySettings, **kwargs: Any) -> Gateway:
    """The ASGI app for ``settings`` (raises AlbertError for missing keys or whitelist)."""
    return Gateway(settings, **kwargs)
