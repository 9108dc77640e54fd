"""The gateway on its TCP port and its unix socket at once (``albert api --uds``), as the deploy
runs it behind HAProxy: a real ``albert api`` process (one worker and two), real sockets."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.api.app import client_address
from pyalbert.api.server import bind_unix
from pyalbert.errors import AlbertError

BACKENDS = json.dumps({"m": ["http://127.0.0.1:9"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path: Path, uds: Path, workers: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "api", "--backends", BACKENDS,
            "--no-auth", "--host", "127.0.0.1", "--port", str(port), "--uds", str(uds),
            "--workers", str(workers)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    for _ in range(300):  # bounded: up to ~30 s on a loaded machine
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"albert api did not start: {proc.communicate()[0].decode()[-2000:]}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # uvicorn re-raises the SIGTERM it handled (one worker); its supervisor exits 0 (two)
    assert proc.returncode in (0, -signal.SIGTERM), out.decode()[-2000:]
    return out.decode()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_both_sockets_served_and_forwarded_for_trusted_on_the_unix_socket_only(tmp_path, workers):
    uds = tmp_path / "sockets" / "blue.sock"
    uds.parent.mkdir()
    uds.touch()  # not a socket: refused, never deleted
    proc = subprocess.run([sys.executable, "-c", "from pyalbert.cli import run; run()", "api",
                           "--backends", BACKENDS, "--no-auth", "--port", str(free_port()),
                           "--uds", str(uds)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is not a socket" in proc.stderr and uds.is_file()
    uds.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(uds))  # a socket file a dead gateway left: replaced
    stale.close()
    proc, port = start(tmp_path, uds, workers)
    try:
        assert stat.S_ISSOCK(uds.stat().st_mode) and stat.S_IMODE(uds.stat().st_mode) == 0o600
        for _ in range(workers * 4):  # new connections: with two workers, both take some
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), timeout=10) as over_unix:
                r = over_unix.get("http://gateway/v1/models", headers={"X-Forwarded-For": "203.0.113.7"})
            assert r.status_code == 200 and r.json()["object"] == "list"
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"X-Forwarded-For": "6.6.6.6"},
                      timeout=10)
        assert r.status_code == 200
    finally:
        out = stop(proc)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    clients = [r["client"] for r in records if r.get("path") == "/v1/models"]
    # the front door's address of the client over the socket; the TCP peer as itself
    assert clients.count("203.0.113.7") == workers * 4 and clients.count("127.0.0.1") == 1
    assert "6.6.6.6" not in out


def test_client_address_reads_forwarded_for_only_without_a_peer():
    xff = [(b"x-forwarded-for", b"10.9.8.7, 192.0.2.1")]
    assert client_address({"client": None, "headers": xff}) == "192.0.2.1"  # the proxy's last hop
    assert client_address({"client": ("127.0.0.1", 5000), "headers": xff}) == "127.0.0.1"
    assert client_address({"client": ("10.0.0.5", 5000), "headers": xff}) == "10.0.0.5"
    assert client_address({"client": None, "headers": []}) is None


def test_a_missing_folder_is_made_searchable_and_the_socket_private(tmp_path):
    sock = bind_unix(str(tmp_path / "edge" / "sockets" / "green.sock"), 16)
    sock.close()
    for folder in (tmp_path / "edge", tmp_path / "edge" / "sockets"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o700 == 0o700  # the user may enter it
    assert stat.S_IMODE((tmp_path / "edge" / "sockets" / "green.sock").stat().st_mode) == 0o600


def test_a_socket_where_no_folder_can_be_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(AlbertError, match="cannot listen on the unix socket"):
        bind_unix(str(tmp_path / "file" / "green.sock"), 16)
