"""A lean keep-alive HTTP/1.1 client for the vLLM replicas: asyncio protocol + httptools parser.

Why not httpx/aiohttp: the gateway must add well under a millisecond per request, and a general
client costs several hundred microseconds of CPU. This one does only what the gateway needs:
``POST``/``GET`` with a bytes body, a connection pool per replica, a response whose head is
awaited (first-byte timeout) and whose body is read whole or chunk by chunk (for SSE) with
backpressure, and timers that abort the connection instead of wrapping every await.

Backpressure applies to streamed bodies only: while a slow client has not taken what
:meth:`Response.next_chunk` returned, reading from the replica pauses past ``HIGH_WATER`` and
resumes when the client catches up. A body read whole (:meth:`Response.read`) is never paused: the
reader waits for its end, so pausing would wait forever (issue 14: answers over 256 KiB never
arrived). A connection goes back to the pool reading.

Errors: :class:`ConnectFailed` (nothing reached the replica: safe to retry elsewhere),
:class:`UpstreamTimeout` (which phase in ``.phase``), :class:`UpstreamBroken` (the connection died
or the response was malformed after the request was sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from urllib.parse import urlsplit

import httptools

#: stop reading from a replica while this much *streamed* body waits for a slow client
HIGH_WATER = 256 * 1024
MAX_IDLE = 512


class UpstreamError(Exception):
    """Base of every failure talking to a replica."""


class ConnectFailed(UpstreamError):
    """The replica could not be reached; the request was not sent."""


class UpstreamBroken(UpstreamError):
    """The connection failed after the request was sent."""


class UpstreamTimeout(UpstreamError):
    def __init__(self, phase: str, seconds: float):
        super().__init__(f"no {phase} from the upstream within {seconds:g} s")
        self.phase = phase
        self.seconds = seconds


class Response:
    """An upstream response: ``status`` and ``headers`` once :meth:`Pool.request` returns."""

    __slots__ = ("status", "headers", "_chunks", "_size", "_done", "_error", "_waiter", "_conn",
                 "head_timer", "total_timer", "_paused", "_whole")

    def __init__(self, conn: Connection):
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._conn = conn
        self.head_timer: asyncio.TimerHandle | None = None
        self.total_timer: asyncio.TimerHandle | None = None
        self._paused = False
        #: read() waits for the whole body: no pausing, no wake-up per piece
        self._whole = False

    # -- fed by the connection -------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._whole:
            return
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            transport = self._conn.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def _finish(self) -> None:
        self._done = True
        self._cancel_timers()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._done:
            return
        self._error = exc
        self._done = True
        self._cancel_timers()
        self._wake()

    def _cancel_timers(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.total_timer is not None:
            self.total_timer.cancel()
            self.total_timer = None

    # -- used by the gateway ---------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._done and self._error is None

    async def _wait(self) -> None:
        waiter = self._conn.loop.create_future()
        self._waiter = waiter
        await waiter

    async def read(self) -> bytes:
        """The whole body (raises the connection's error if it broke)."""
        self._whole = True
        self._resume()
        while not self._done:
            await self._wait()
        if self._error is not None:
            raise self._error
        return b"".join(self._chunks)

    async def next_chunk(self) -> bytes | None:
        """What arrived since the last call (possibly several reads joined), ``None`` at the end."""
        while not self._chunks:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._paused:
            self._resume()
        return data

    def close(self) -> None:
        """Give the connection back if the response was read to its end, else drop it."""
        self._cancel_timers()
        self._conn.release(self)


class Connection(asyncio.Protocol):
    __slots__ = ("pool", "loop", "transport", "parser", "response", "head", "keep_alive",
                 "received", "_header_name")

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head: asyncio.Future | None = None
        self.keep_alive = False
        self.received = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._break(UpstreamBroken(f"malformed response from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self._break(UpstreamBroken("the upstream closed the connection"))

    # -- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        response.status = self.parser.get_status_code()
        if response.head_timer is not None:
            response.head_timer.cancel()
            response.head_timer = None
        self.keep_alive = self.parser.should_keep_alive()
        head = self.head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._finish()

    # -- internal --------------------------------------------------------------------------
    def _break(self, exc: UpstreamError) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(exc)
        if self.response is not None:
            self.response._fail(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def timeout(self, phase: str, seconds: float) -> None:
        self.keep_alive = False
        self._break(UpstreamTimeout(phase, seconds))

    def release(self, response: Response) -> None:
        if self.response is not response:
            return
        reusable = response.complete and self.keep_alive and not self.transport.is_closing()
        self.response = None
        self.head = None
        if reusable:
            response._resume()  # paused by a streamed body that then ended: read the next answer
            self.pool.put(self)
        else:
            self.pool.forget(self)
            if not self.transport.is_closing():
                self.transport.abort()


class Pool:
    """Keep-alive connections to one replica (``http://host:port``)."""

    def __init__(self, base_url: str, *, connect_timeout: float = 5.0, api_key: str | None = None):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"backend URL {base_url!r} must look like http://host:port")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = f"{self.host}:{self.port}".encode()
        #: the replica's own key (vLLM ``--api-key``), sent on every request; never the client's
        if api_key and ("\r" in api_key or "\n" in api_key):
            raise ValueError("the upstream api key holds a line break")
        self.host_header += b"\r\nAuthorization: Bearer " + api_key.encode() if api_key else b""
        self.connect_timeout = connect_timeout
        self.idle: deque[Connection] = deque()
        self.open = 0
        #: removed from the backends: connections close when their request ends
        self.retired = False

    def put(self, conn: Connection) -> None:
        if len(self.idle) < MAX_IDLE and not self.retired:
            self.idle.append(conn)
        else:
            self.forget(conn)
            conn.transport.close()

    def close_idle(self) -> None:
        """Close the kept-alive connections (a replica removed from the backends)."""
        self.retired = True
        while self.idle:
            self.idle.popleft().transport.close()

    def forget(self, conn: Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self, loop), self.host, self.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectFailed(
                f"cannot connect to {self.host}:{self.port} within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectFailed(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return conn

    def build(self, method: bytes, path: bytes, body: bytes | None) -> bytes:
        if body is None:
            return b"%s %s%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (
                method, self.prefix, path, self.host_header)
        return b"%s %s%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" \
               b"Content-Length: %d\r\n\r\n%s" % (
                   method, self.prefix, path, self.host_header, len(body), body)

    async def request(self, method: bytes, path: bytes, body: bytes | None = None, *,
                      first_byte_timeout: float = 120.0, total_timeout: float = 600.0) -> Response:
        """Send a request and wait for the response head. The caller must ``close()`` it."""
        loop = asyncio.get_running_loop()
        data = self.build(method, path, body)
        while True:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else await self._connect(loop)
            if conn.transport.is_closing():
                continue
            response = Response(conn)
            conn.response = response
            conn.received = False
            conn.head = head = loop.create_future()
            response.head_timer = loop.call_later(
                first_byte_timeout, conn.timeout, "response head", first_byte_timeout)
            response.total_timer = loop.call_later(
                total_timeout, conn.timeout, "complete response", total_timeout)
            conn.transport.write(data)
            try:
                await head
            except UpstreamBroken:
                response.close()
                if reused and not conn.received:
                    continue  # a stale keep-alive connection: the replica never saw the request
                raise
            except BaseException:
                response.close()
                raise
            return response
