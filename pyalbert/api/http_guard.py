"""uvicorn's httptools protocol with a cap on request heads and a deadline for each request.

uvicorn caps nothing with httptools (``h11_max_incomplete_event_size`` is for h11 only) and its
keep-alive timer stops at a request's first byte: a 64 MiB header was read and parsed (9.5 s of
the event loop, every other client stalled), and a client trickling a byte at a time held its
connection for ever (issue 14). This subclass adds, for the cost of a counter and one timer per
request:

- ``max_header_bytes``: request line + headers. Raw bytes are counted while a head is incomplete,
  so a huge head is refused after at most one more socket read (uvicorn's parser is never fed
  more), and the parsed head is measured exactly before the app sees it. Over the cap: ``431``,
  connection closed.
- ``read_timeout_s``: a request (line, headers and body) must arrive within this from its first
  byte, and a new connection must start one within it. Else ``408`` (when no response is under
  way) and the connection is closed; an app waiting for the body sees a disconnect. Time while
  the server itself does not read (flow control) does not count.

The limits come from the app (``app.http_limits``: the gateway's settings); any other app gets
the defaults below. Select it with uvicorn's ``http="pyalbert.api.http_guard:GuardedHttpToolsProtocol"``.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

PROTOCOL = "pyalbert.api.http_guard:GuardedHttpToolsProtocol"


#: the reason label of albert_rejections_total for what this protocol refuses
REASONS = {408: "request_timeout", 431: "header_too_large"}


class HttpLimits(NamedTuple):
    max_header_bytes: int = 32 * 1024
    read_timeout_s: float = 30.0


class HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing a head over the cap."""


def _answer(status: int, message: str) -> bytes:
    body = message.encode()
    return b"".join([STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body])


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(self.app, "http_limits", None) or HttpLimits()
        self.max_head = limits.max_header_bytes
        self.read_timeout = limits.read_timeout_s
        self.in_head = True  # between requests or inside a head: bytes count against the cap
        self.head_raw = 0  # raw bytes received while in_head
        self.head_parsed = 0  # request line + headers as parsed
        self.read_timer: asyncio.TimerHandle | None = None

    # -- the deadline ----------------------------------------------------------------------
    def _arm(self) -> None:
        self.read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timed_out(self) -> None:
        self.read_timer = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            self._arm()  # we stopped reading (a pipelined request, a body the app has not taken)
            return
        cycle = self.cycle
        if self.in_head and (cycle is None or cycle.response_complete):
            self._refuse(408, f"request not received within {self.read_timeout:g} s")
        else:
            self.transport.close()  # the app waits for a body that does not come: a disconnect

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        reject = getattr(getattr(self.app, "metrics", None), "reject", None)
        if reject is not None:  # the gateway's albert_rejections_total (no key: not read yet)
            reject("", status, REASONS.get(status, "refused"))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            self.transport.close()
            return
        self.transport.write(_answer(status, message))
        self.transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.in_head:
            self.head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._refuse(431, f"request line and headers larger than {self.max_head} bytes")
                return
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
            return
        if self.in_head and self.head_raw > self.max_head and not self.transport.is_closing():
            self._refuse(431, f"request line and headers larger than {self.max_head} bytes")

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.head_parsed = 0
        if self.read_timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self.head_parsed += len(url)
        if self.head_parsed > self.max_head:
            raise HeadTooLarge
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_parsed += len(name) + len(value) + 4  # ": " and CRLF
        if self.head_parsed > self.max_head:
            raise HeadTooLarge
        # uvicorn's on_header, inlined (one call per header on every request)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_head = True
        self.head_raw = 0
        super().on_message_complete()
