"""``albert hub serve`` against what an attacker sends: raw sockets and a real client on 127.0.0.1.

- decoded paths and revisions never become header lines (CR/LF) nor break the answer (non-latin-1);
- requests whose head does not arrive in time are cut, and no more than ``max_connections``
  handler threads exist whatever the number of idle half-sent requests.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.hub.mirror import protocol
from pyalbert.hub.mirror.service import Mirror

FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "mirror" / "org" / "tiny"
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    return tmp_path / "mirror"


@pytest.fixture
def serve():
    """serve(mirror, **server options) -> (host, port); every server stopped at teardown."""
    stops = []

    def start(mirror: Mirror, **options) -> tuple[str, int]:
        url, stop = mirror.serve_in_thread("127.0.0.1", 0, **options)
        stops.append(stop)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    yield start
    for stop in stops:
        stop()


def raw_exchange(address: tuple[str, int], request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes (bounded)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        chunks, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_head(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    """(status, [(name, value)]) of the first answer; lines split on CR, LF or CRLF, as a lenient
    client (or a proxy) would."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete answer head in {raw[:300]!r}"
    lines = re.split(r"\r\n|\n|\r", head.decode("latin-1"))
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return status, headers


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n".encode()


INJECTION = "x%0d%0aSet-Cookie:%20pwn=1"


@pytest.mark.parametrize(("path", "code"), [
    (f"/org/tiny/resolve/{INJECTION}/config.json", "RevisionNotFound"),
    (f"/org/tiny/resolve/main/{INJECTION}.json", "EntryNotFound"),
    (f"/api/models/org/tiny/revision/{INJECTION}", "RevisionNotFound"),
    ("/org/tiny/resolve/x%0aSet-Cookie:%20pwn=1/config.json", "RevisionNotFound"),
    ("/org/tiny/resolve/x%0dSet-Cookie:%20pwn=1/config.json", "RevisionNotFound"),
], ids=["revision-crlf", "path-crlf", "api-revision-crlf", "revision-lf", "revision-cr"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_decoded_crlf_never_makes_a_header_line(root, serve, path, code, method):
    address = serve(Mirror(root, cache_path=None))
    raw = raw_exchange(address, get(path).replace(b"GET", method.encode(), 1))

    status, headers = parse_head(raw)
    names = [name.lower() for name, _ in headers]
    assert status == 404 and "set-cookie" not in names
    assert dict(headers)["X-Error-Code"] == code
    message = dict(headers)["X-Error-Message"]
    assert "Set-Cookie: pwn=1" in message and "\r" not in message and "\n" not in message


@pytest.mark.parametrize(("path", "code", "shown"), [
    ("/org/tiny/resolve/%E2%98%83/config.json", "RevisionNotFound", "\\u2603"),
    ("/org/tiny/resolve/main/%E2%98%83.json", "EntryNotFound", "\\u2603.json"),
    ("/org/tiny/resolve/%E9t%E9/config.json", "RevisionNotFound", "\\ufffdt\\ufffd"),  # not UTF-8
    ("/org/tiny/resolve/caf%C3%A9/config.json", "RevisionNotFound", "caf\\xe9"),  # latin-1, not ASCII
], ids=["snowman-revision", "snowman-path", "invalid-utf8", "latin1"])
def test_non_latin1_names_get_a_whole_answer(root, serve, path, code, shown):
    host, port = serve(Mirror(root, cache_path=None))
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as client:
        answer = client.get(path)  # raw path: httpx sends it as is
    assert answer.status_code == 404
    assert answer.headers["X-Error-Code"] == code
    assert shown in answer.headers["X-Error-Message"]
    assert answer.headers["X-Error-Message"].isascii()


def test_the_huggingface_client_still_reads_the_error(root, serve, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    host, port = serve(Mirror(root, cache_path=None))
    with pytest.raises(hf.RevisionNotFoundError):
        HfApi(endpoint=f"http://{host}:{port}").model_info("org/tiny", revision="v\u2603\r\nX-Evil: 1")


@pytest.mark.parametrize(("text", "expected"), [
    ("plain text: ok", "plain text: ok"),
    ("a\r\nSet-Cookie: x", "a\\r\\nSet-Cookie: x"),
    ("tab\there", "tab\\there"),
    ("caf\u00e9 \u2603 \x7f \x00", "caf\\xe9 \\u2603 \\x7f \\x00"),
])
def test_header_value_is_printable_ascii(text, expected):
    assert protocol.header_value(text) == expected


def test_header_value_is_bounded():
    long = protocol.header_value("a" * 10_000)
    assert len(long) <= 1024 and long.endswith("...")


# -- timeouts and the thread cap ---------------------------------------------------------------

def half_sent(address: tuple[str, int], n: int) -> list[socket.socket]:
    """``n`` connections that each send the start of a request head and then nothing."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(b"GET /api/models/org/tiny HTTP/1.1\r\nHost: mirror\r\n")
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before closing (``None``: still open at ``deadline``)."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def test_300_idle_half_sent_requests_hold_at_most_the_cap_and_are_cut(root, serve):
    cap, timeout = 16, 2.0
    before = threading.active_count()
    address = serve(Mirror(root, cache_path=None), max_connections=cap, request_timeout_s=timeout)
    started = time.monotonic()
    socks = half_sent(address, 300)
    opened_in = time.monotonic() - started
    try:
        time.sleep(0.3)
        held = threading.active_count() - before
        assert held <= cap + 2, f"{held} threads for 300 idle half-sent requests (cap {cap})"

        # every one is answered or closed, the held ones once their head is late
        outcomes = [closed_by_server(s, started + timeout + opened_in + 5) for s in socks]
        assert all(o is not None for o in outcomes), \
            f"{sum(o is None for o in outcomes)} connection(s) still open {timeout + 5:.0f} s later"
        refused = [o for o in outcomes if o.startswith(b"HTTP/1.1 503")]
        assert all(b"Retry-After: 1" in o for o in refused)
        assert all(o == b"" for o in outcomes if o not in refused)  # cut without an answer
        # slots free up every `timeout` seconds while the 300 connect
        assert len(refused) >= 300 - cap * (1 + int(opened_in / timeout))
        assert time.monotonic() - started < timeout + opened_in + 4
    finally:
        for s in socks:
            s.close()
    # the slots are free again: a real client gets its answer
    host, port = address
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as client:
        assert client.get("/api/models/org/tiny").status_code == 200


def test_a_head_sent_one_byte_at_a_time_is_cut_at_the_deadline(root, serve):
    timeout = 1.0
    address = serve(Mirror(root, cache_path=None), request_timeout_s=timeout)
    request = get("/api/models/org/tiny")
    with socket.create_connection(address, timeout=5) as sock:
        started = time.monotonic()
        cut_after = None
        for byte in request[:-2]:  # never the final CRLF; a byte every 0.2 s resets no timer
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut_after = time.monotonic() - started
                break
            if closed_by_server(sock, time.monotonic() + 0.2) is not None:
                cut_after = time.monotonic() - started
                break
            if time.monotonic() - started > timeout + 3:
                break
    assert cut_after is not None and cut_after < timeout + 1, f"still open after {cut_after} s"


def test_idle_keep_alive_connection_is_closed_and_a_new_one_works(root, serve):
    timeout = 1.0
    host, port = serve(Mirror(root, cache_path=None), request_timeout_s=timeout)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /api/models/org/tiny HTTP/1.1\r\nHost: mirror\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        rest = closed_by_server(sock, started + timeout + 3)
        assert rest is not None and time.monotonic() - started < timeout + 1
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as client:
        assert client.get("/org/tiny/resolve/main/config.json").content == FILES["config.json"]


def test_default_server_caps_threads_and_times_out(root):
    server = Mirror(root, cache_path=None).make_server("127.0.0.1", 0)
    try:
        assert 1 <= server.max_connections <= 256
        assert 0 < server.request_timeout_s <= 60 and 0 < server.io_timeout_s <= 300
    finally:
        server.server_close()


def test_a_busy_mirror_makes_the_hub_client_retry_not_fail(root, serve, tmp_path, monkeypatch):
    """Every slot held by a half-sent request: huggingface_hub gets 503 + Retry-After, retries,
    and downloads once the slot is freed by the head deadline."""
    from huggingface_hub import hf_hub_download

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    host, port = serve(Mirror(root, cache_path=None), max_connections=1, request_timeout_s=1.0)
    [held] = half_sent((host, port), 1)
    try:
        started = time.monotonic()
        got = hf_hub_download("org/tiny", "config.json", endpoint=f"http://{host}:{port}",
                              local_dir=tmp_path / "out")
        assert Path(got).read_bytes() == FILES["config.json"]
        assert 0.5 < time.monotonic() - started < 15  # waited for the slot, then got it
    finally:
        held.close()


def test_cli_max_connections_must_be_positive(root, capsys):
    from pyalbert.cli import main
    from pyalbert.hub.mirror.folders import MirrorError

    assert main(["hub", "serve", "--root", str(root), "--port", "0", "--max-connections", "0"]) \
        == MirrorError.exit_code
    err = capsys.readouterr().err
    assert "max_connections=0" in err and "Fix: --max-connections 1 or more" in err
