"""Serving the gateway: uvicorn (httptools + uvloop), workers from the environment's ``api.workers``.

The gateway listens on its TCP port (readiness, metrics, direct checks) and, when ``uds`` is set,
on a unix socket too: the front door's way in (HAProxy's server ``unix@<socket>``), which skips
the kernel's loopback TCP. Both sockets are bound here, in the parent, and shared by the workers.
The socket file is created ``0600`` (HAProxy runs as the same user, on both runtimes); the file
stays after a stop (uvicorn ends by re-raising SIGTERM) and the next start replaces it.

Workers are processes started by uvicorn; they rebuild the app from ``$ALBERT_API_SETTINGS``.
SIGHUP: with one worker the gateway reloads keys and whitelist in place; with several, uvicorn's
supervisor replaces the workers one by one (each new worker reads both files at start).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from pyalbert.api import http_guard
from pyalbert.api.app import Gateway, create_app
from pyalbert.api.settings import SETTINGS_ENV, GatewaySettings
from pyalbert.errors import AlbertError

#: the unix socket's mode: only the gateway's user (HAProxy's too) may connect
UDS_MODE = 0o600


def uvicorn_options(settings: GatewaySettings) -> dict:
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "http": http_guard.PROTOCOL,  # httptools, with a head cap (431) and a read deadline (408)
        "loop": "uvloop",
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        "server_header": False,
        "proxy_headers": False,
        "timeout_keep_alive": 75,
        "backlog": 4096,
        "timeout_graceful_shutdown": max(1, int(min(settings.total_timeout_s, 30))),
    }


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AlbertError(f"the gateway cannot listen on {host}:{port} ({exc.strerror}). Fix: stop "
                          "what holds that port, or pass another --port.") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def bind_unix(path: str, backlog: int) -> socket.socket:
    """Listen on ``path`` (mode :data:`UDS_MODE`); a stale socket file there is removed first,
    anything else at that path is refused (never deleted)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AlbertError(f"the gateway's socket path {path} exists and is not a socket. Fix: "
                              "remove it, or pass another --uds.")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        old_umask = os.umask(0o177)  # the socket file: no moment where others could connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
    except OSError as exc:
        sock.close()
        raise AlbertError(f"the gateway cannot listen on the unix socket {path} "
                          f"({exc.strerror}). Fix: make its folder writable by this user.") from None
    os.chmod(path, UDS_MODE)
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def listen(settings: GatewaySettings, backlog: int) -> list[socket.socket]:
    """The gateway's listening sockets: its TCP port, then its unix socket (``uds``)."""
    sockets = [bind_tcp(settings.host, settings.port, backlog)]
    if settings.uds:
        try:
            sockets.append(bind_unix(settings.uds, backlog))
        except AlbertError:
            sockets[0].close()
            raise
    return sockets


def serve(settings: GatewaySettings) -> None:
    """Run until SIGINT/SIGTERM. Broken keys/whitelist fail here, before any worker starts."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    create_app(settings)  # validates keys and whitelist in the parent: one clear error
    os.environ[SETTINGS_ENV] = settings.to_json()
    options = uvicorn_options(settings)
    config = uvicorn.Config("pyalbert.api.server:app_from_environ", factory=True, **options)
    sockets = listen(settings, options["backlog"])
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            server = uvicorn.Server(config)
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=sockets)
            if not server.started:
                raise SystemExit(3)  # uvicorn's STARTUP_FAILURE (the lifespan said why)
    finally:
        for sock in sockets:
            sock.close()


def app_from_environ() -> Gateway:
    return create_app(GatewaySettings.from_environ())
