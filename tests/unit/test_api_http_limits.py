"""Request heads are capped (431) and slow senders timed out (408), on the real gateway socket.

Issue 14: a 64 MiB header was accepted and took 9.5 s to parse while ``/health`` stalled for
everyone else; a client trickling bytes held its connection for ever.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import httpx
import pytest

from pyalbert.api.answers import Answers
from pyalbert.api.app import Gateway
from pyalbert.api.settings import GatewaySettings
from tests.support.fake_upstream import FakeUpstream, GatewayServer

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def serve(fake):
    started = []

    def start(**settings) -> GatewayServer:
        settings.setdefault("open_access", True)
        app = Gateway(GatewaySettings(backends={"m": [fake.url]}, access_log=False, **settings),
                      answers=Answers("off"), log_stream=io.BytesIO())
        server = GatewayServer(app).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(wait=False)


def address(server: GatewayServer) -> tuple[str, int]:
    return "127.0.0.1", int(server.url.rsplit(":", 1)[1])


def exchange(server: GatewayServer, raw: bytes, timeout: float = 10) -> bytes:
    """Send ``raw``, return everything the gateway answers until it closes or goes quiet."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        data = b""
        try:
            while piece := sock.recv(65536):
                data += piece
                if b"\r\n\r\n" in data and b"connection: close" not in data.lower():
                    break
        except ConnectionResetError:
            pass
        return data


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    return int(answer[9:12])


def test_request_heads_up_to_the_cap_are_served(serve):
    server = serve()
    limit = server.server.config.loaded_app.settings.max_header_bytes
    r = httpx.get(server.url + "/health", headers={"x-pad": "a" * (limit - 1024)})
    assert r.status_code == 200
    r = httpx.get(server.url + "/health?" + "q" * (limit - 1024))
    assert r.status_code == 200


@pytest.mark.parametrize("where", ["request-line", "one-header", "many-headers"])
def test_request_heads_over_the_cap_are_431(serve, where):
    server = serve()
    limit = server.server.config.loaded_app.settings.max_header_bytes
    if where == "request-line":
        raw = b"GET /health?" + b"q" * (limit + 1) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    elif where == "one-header":
        raw = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (limit + 1) + b"\r\n\r\n"
    else:
        raw = (b"GET /health HTTP/1.1\r\nHost: x\r\n"
               + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(limit // 60 + 10))
               + b"\r\n")
    answer = exchange(server, raw)
    assert status_of(answer) == 431
    assert b"connection: close" in answer.lower()
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'albert_rejections_total{key="",status="431",reason="header_too_large"} 1' in metrics


def test_a_64_mib_header_is_cut_off_early_and_others_are_served(serve):
    server = serve()
    limit = server.server.config.loaded_app.settings.max_header_bytes
    sent = 0
    answer = b""

    def attack() -> None:
        nonlocal sent, answer
        with socket.create_connection(address(server), timeout=20) as sock:
            piece = b"a" * (256 * KiB)
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while sent < 64 * MiB:
                    sock.sendall(piece)
                    sent += len(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                answer = b"reset"

    thread = threading.Thread(target=attack)
    thread.start()
    health = []
    while thread.is_alive() and len(health) < 50:
        health.append(httpx.get(server.url + "/health", timeout=20).status_code)
    thread.join(30)
    assert not thread.is_alive()
    assert sent < 64 * MiB  # the gateway closed the connection: the sender could not finish
    assert sent < limit + 16 * MiB  # (socket buffers hold a few MiB on loopback)
    assert answer.startswith(b"HTTP/1.1 431") or answer in (b"", b"reset")
    assert set(health) <= {200}
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_trickling_its_head_is_timed_out(serve):
    server = serve(read_timeout_s=0.5)
    with socket.create_connection(address(server), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        answer = b""
        try:
            for _ in range(200):  # one header byte every 50 ms: each read is quick, the whole is not
                sock.sendall(b"X")
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while piece := sock.recv(65536):
                answer += piece
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 9
    assert status_of(answer) == 408


def test_an_idle_connection_is_closed(serve):
    server = serve(read_timeout_s=0.3)
    with socket.create_connection(address(server), timeout=10) as sock:
        answer = sock.recv(65536)  # nothing sent at all
        while piece := sock.recv(65536):
            answer += piece
    assert status_of(answer) == 408


def test_a_client_stalling_in_its_body_is_timed_out(serve, fake):
    server = serve(read_timeout_s=0.5)
    before = len(fake.requests)
    with socket.create_connection(address(server), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                     b'{"model": "m", "messages": [')
        start = time.monotonic()
        answer = b""
        try:
            while piece := sock.recv(65536):
                answer += piece
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 9  # closed by the gateway, not by our socket timeout
    assert answer == b"" or status_of(answer) == 408
    assert len(fake.requests) == before  # nothing was sent upstream


def test_keep_alive_requests_each_get_the_whole_timeout(serve):
    """The timer covers one request's arrival, not the connection's life."""
    server = serve(read_timeout_s=0.4)
    with httpx.Client(timeout=10) as client:
        for _ in range(4):
            assert client.get(server.url + "/health").status_code == 200
            time.sleep(0.2)
        r = client.post(server.url + "/v1/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": "x" * 500_000}]})
        assert r.status_code == 200
