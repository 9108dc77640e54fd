"""A local OCI registry: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Started by the test that needs it, on a free port, with its storage in the test's temp dir and,
optionally, htpasswd (bcrypt) authentication; stopped by PID even when the test fails. dockerd
treats 127.0.0.0/8 registries as insecure (plain HTTP) by default, so no daemon setting is needed.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"


@dataclass(frozen=True)
class LocalRegistry:
    host: str  # 127.0.0.1:<port>
    user: str | None
    password: str | None
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # libxcrypt does bcrypt; the registry accepts only bcrypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


def _config(root: Path, port: int, htpasswd: Path | None) -> str:
    auth = (f"auth:\n  htpasswd:\n    realm: albert-test\n    path: {htpasswd}\n"
            if htpasswd else "")
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + auth
    )


def _ready(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/v2/", timeout=1)
        return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, wants credentials
    except OSError:
        return False


@contextlib.contextmanager
def local_registry(root: Path, user: str | None = None, password: str | None = None,
                   timeout: float = 20) -> Iterator[LocalRegistry]:
    root.mkdir(parents=True, exist_ok=True)
    htpasswd = None
    if user and password:
        htpasswd = root / "htpasswd"
        htpasswd.write_text(f"{user}:{_bcrypt(password)}\n")
    port = free_port()
    config = root / "config.yml"
    config.write_text(_config(root, port, htpasswd))
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    registry = LocalRegistry(f"127.0.0.1:{port}", user, password, root)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(registry.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()}")
            time.sleep(0.1)
        yield registry
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
