"""The mirror's HTTP server: a thread per connection up to a cap (503 + Retry-After past it), a
deadline for each request head, an I/O timeout on every socket operation, safe header values, and
the handler answering the hub's endpoints (bodies sent with ``sendfile``)."""

from __future__ import annotations

import hmac
import io
import json
import socket
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from pyalbert.hub.mirror.folders import MirrorError, RepoSnapshot
from pyalbert.hub.mirror.protocol import (
    DEFAULT_REVISION,
    FileMeta,
    RangeNotSatisfiable,
    bearer_token,
    byte_range,
    error_body,
    error_headers,
    file_headers,
    header_value,
    match_route,
    model_info,
    tree,
)

if TYPE_CHECKING:
    from pyalbert.hub.mirror.service import Mirror

#: connections handled at once (one thread each); more are answered 503 + Retry-After at once
MAX_CONNECTIONS = 64
#: a request head (line + headers) must arrive within this, counted from when the connection
#: starts waiting for it (so it is also the keep-alive idle timeout)
REQUEST_TIMEOUT_S = 20.0
#: any single read or write that makes no progress for this long ends the connection
IO_TIMEOUT_S = 60.0

def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


#: the answer when every slot is taken: clients (huggingface_hub included) retry a 503
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
               b"X-Error-Code: Busy\r\nX-Error-Message: mirror busy, retry\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")


class MirrorServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; the handler enforces the
    timeouts. A connection over the cap gets :data:`BUSY_ANSWER` from the accepting thread
    (non-blocking: a client that does not read cannot stall the accept loop)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, io_timeout_s: float = IO_TIMEOUT_S) -> None:
        if max_connections < 1 or request_timeout_s <= 0 or io_timeout_s <= 0:
            raise MirrorError(f"the mirror cannot serve with max_connections={max_connections}, "
                              f"request_timeout_s={request_timeout_s}, io_timeout_s={io_timeout_s}. "
                              "Fix: --max-connections 1 or more (default 64); timeouts above 0.")
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.io_timeout_s = io_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections answered 503 because every slot was taken
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)
            try:  # read what already arrived, so that closing sends FIN, not RST
                while request.recv(65536):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            request.send(BUSY_ANSWER)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):  # a client gone or too slow
            super().handle_error(request, client_address)


class _HeadDeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by the I/O timeout and, while a request head is
    awaited, by what is left of its deadline: a head sent a byte at a time is cut all the same."""

    def __init__(self, handler: MirrorHandler) -> None:
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        handler = self.handler
        timeout = handler.server.io_timeout_s
        if handler.head_deadline is not None:
            left = handler.head_deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            timeout = min(timeout, left)
        handler.connection.settimeout(timeout)
        return handler.connection.recv_into(buffer)


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mirror: Mirror
    server: MirrorServer
    server_version = "albert-hub-mirror"
    head_deadline: float | None = None

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.io_timeout_s)  # writes (sendfile included) too
        plain, self.rfile = self.rfile, io.BufferedReader(_HeadDeadlineReader(self))
        plain.close()  # (the socket's own file: closed, or the socket would outlive the handler)

    def handle_one_request(self) -> None:
        # the head of the next request is due within request_timeout_s (idle keep-alive included);
        # past it, a read raises TimeoutError, which the stdlib turns into closing the connection
        self.head_deadline = time.monotonic() + self.server.request_timeout_s
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.head_deadline = None  # the head is in: the answer only has the I/O timeout
        return ok

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        if self.mirror.log is not None:
            self.mirror.log(header_value(f"{self.address_string()} {format % args}", 4096))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.mirror.log is None:
            return
        status = getattr(code, "value", code)
        wanted = self.headers.get("Range") if self.headers is not None else None
        self.mirror.log(header_value(f'"{self.requestline}" {status}' + (f" range={wanted}" if wanted else ""),
                                     4096))

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _send(self, status: int, headers: Mapping[str, str], body: bytes = b"", *, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, header_value(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, commit: str | None = None, *, head: bool) -> None:
        self._send(status, error_headers(code, message, commit), error_body(message), head=head)

    def _handle(self, *, head: bool) -> None:
        try:
            self._route(head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        route = match_route(url.path)
        if route is None:
            return self._error(404, "NotFound", "no such endpoint", head=head)
        mirror = self.mirror
        if mirror.token is not None:
            token = bearer_token(self.headers.get("Authorization"))
            if token is None:
                return self._error(401, "GatedRepo", "This mirror needs a token: send "
                                   "'Authorization: Bearer <token>' (set HF_TOKEN).", head=head)
            if not hmac.compare_digest(token.encode(), mirror.token.encode()):
                return self._error(403, "GatedRepo", "This mirror refused the token.", head=head)
        snap = mirror.snapshot(route.repo)
        if snap is None:
            return self._error(404, "RepoNotFound", "Repository not found", head=head)
        if route.revision not in (DEFAULT_REVISION, snap.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {route.revision}", head=head)
        if route.kind == "info":
            body = json.dumps(model_info(snap.repo_id, snap.commit, snap.files,
                                         blobs="blobs" in parse_qs(url.query))).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head=head)
        if route.kind == "tree":
            body = json.dumps(tree(snap.files, route.path)).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head=head)
        meta = snap.files.get(route.path)
        if meta is None:
            return self._error(404, "EntryNotFound", f"{route.path} does not exist", snap.commit, head=head)
        self._file(snap, route.path, meta, head=head)

    def _file(self, snap: RepoSnapshot, path: str, meta: FileMeta, *, head: bool) -> None:
        headers = file_headers(snap.commit, meta)
        try:
            wanted = None if head else byte_range(self.headers.get("Range"), meta.size)
        except RangeNotSatisfiable:
            return self._send(416, {**headers, "Content-Range": f"bytes */{meta.size}"}, head=head)
        try:
            fh = open(snap.folder / path, "rb")  # noqa: SIM115 - closed below, after sendfile
        except OSError:  # removed since the listing
            return self._error(404, "EntryNotFound", f"{path} does not exist", snap.commit, head=head)
        with fh:
            first, last = wanted if wanted is not None else (0, meta.size - 1)
            count = last - first + 1
            if wanted is not None:
                headers["Content-Range"] = f"bytes {first}-{last}/{meta.size}"
            self.send_response(206 if wanted is not None else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(count))
            self.end_headers()
            if head or count <= 0:
                return
            sent = self.connection.sendfile(fh, first, count)
            if sent < count:  # the file shrank while being sent: the client must not trust it
                self.close_connection = True
