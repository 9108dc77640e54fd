"""The gateway on a unix socket, for the benchmark's ``haproxy~uds`` (HAProxy's server ``unix@``):
``BENCH_UDS=/path python bench/gateway/gateway_uds.py api <albert api options>``.

The same ``albert api`` (settings, app, uvicorn options), listening on ``$BENCH_UDS`` instead of
host:port: what the front door would save if the deploy put HAProxy and the gateways on a socket
of the host instead of loopback TCP (measurement only; the deploy uses ports)."""

from __future__ import annotations

import os

import pyalbert.api.server as server
from pyalbert.cli import run

_tcp_options = server.uvicorn_options


def _uds_options(settings):
    options = {k: v for k, v in _tcp_options(settings).items() if k not in ("host", "port")}
    return {**options, "uds": os.environ["BENCH_UDS"]}


if __name__ == "__main__":
    server.uvicorn_options = _uds_options
    run()
