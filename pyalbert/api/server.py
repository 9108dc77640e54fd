"""Serving the gateway: uvicorn (httptools + uvloop), workers from the environment's ``api.workers``.

Workers are processes started by uvicorn; they rebuild the app from ``$ALBERT_API_SETTINGS``.
SIGHUP: with one worker the gateway reloads keys and whitelist in place; with several, uvicorn's
supervisor replaces the workers one by one (each new worker reads both files at start).
"""

from __future__ import annotations

import os

from pyalbert.api import http_guard
from pyalbert.api.app import Gateway, create_app
from pyalbert.api.settings import SETTINGS_ENV, GatewaySettings


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


def serve(settings: GatewaySettings) -> None:
    """Run until SIGINT/SIGTERM. Broken keys/whitelist fail here, before any worker starts."""
    import uvicorn

    create_app(settings)  # validates keys and whitelist in the parent: one clear error
    os.environ[SETTINGS_ENV] = settings.to_json()
    uvicorn.run("pyalbert.api.server:app_from_environ", factory=True, **uvicorn_options(settings))


def app_from_environ() -> Gateway:
    return create_app(GatewaySettings.from_environ())
