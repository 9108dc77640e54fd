"""The front-door candidates of the gateway benchmark, each in front of its own gateway.

HAProxy runs the config the deploy ships (``pyalbert/templates/haproxy.cfg.j2``, one gateway as
its only server); nginx and Caddy get the closest config we would write for them (upstream
keep-alive, no buffering, X-Forwarded-For set, long timeouts). Every proxy gets one core's worth
of workers (HAProxy ``nbthread 1``, nginx ``worker_processes 1``, Caddy ``GOMAXPROCS=1``), like
the gateway. ``old_edge.py`` is the Python TCP forwarder the proxy replaced, measured for
reference. Each context manager yields (url, proxy pid).
"""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from pyalbert.commands import edge

HERE = Path(__file__).resolve().parent
PROXIES = ("edge.py", "haproxy", "nginx", "caddy")
BINARIES = {"haproxy": edge.HAPROXY_BIN, "nginx": "/usr/sbin/nginx", "caddy": "/usr/bin/caddy"}


def missing(name: str) -> str:
    """Why proxy ``name`` cannot run here ("" when it can)."""
    binary = BINARIES.get(name)
    if binary and not shutil.which(binary):
        return f"{binary} not installed (./scripts/bootstrap installs it)"
    return ""


def haproxy_argv(work: Path, port: int, upstream_port: int, ca: Path | None) -> list[str]:
    config = edge.EdgeConfig(env="bench", port=port, servers=(("gateway", upstream_port),),
                             socket=str(work / "haproxy.sock"), state_file=str(work / "state"),
                             address="127.0.0.1", tls_pem=str(ca / "server.pem") if ca else None)
    (work / "haproxy.cfg").write_text(edge.render_config(config))
    return edge.serve_argv(str(work / "haproxy.cfg"))


def nginx_argv(work: Path, port: int, upstream_port: int, ca: Path | None) -> list[str]:
    tls = (f"ssl_certificate {ca}/server.crt; ssl_certificate_key {ca}/server.key; "
           "ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets off;") if ca else ""
    temps = " ".join(f"{k}_temp_path {work}/{k};" for k in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (work / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; {temps}
  upstream gw {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port}{' ssl http2' if ca else ''}; {tls}
    client_max_body_size 1m;
    location / {{
      proxy_pass http://gw; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off;
      proxy_set_header X-Forwarded-For $remote_addr; proxy_read_timeout 3600s;
    }}
  }}
}}
""")
    return [BINARIES["nginx"], "-p", str(work), "-c", str(work / "nginx.conf"), "-e", "stderr"]


def caddy_argv(work: Path, port: int, upstream_port: int, ca: Path | None) -> list[str]:
    site = f"https://127.0.0.1:{port}" if ca else f"http://127.0.0.1:{port}"
    tls = f"tls {ca}/server.crt {ca}/server.key" if ca else ""
    (work / "Caddyfile").write_text(f"""{{
  admin off
  auto_https disable_redirects
}}
{site} {{
  {tls}
  reverse_proxy 127.0.0.1:{upstream_port} {{
    flush_interval -1
    header_up X-Forwarded-For {{remote_host}}
  }}
}}
""")
    return [BINARIES["caddy"], "run", "--config", str(work / "Caddyfile"), "--adapter", "caddyfile"]


def edge_py_argv(work: Path, port: int, upstream_port: int, ca: Path | None) -> list[str]:
    (work / "upstream").write_text(f"{upstream_port}\n")
    return [sys.executable, str(HERE / "old_edge.py"), "--listen", str(port),
            "--upstream-file", str(work / "upstream")]


ARGV = {"edge.py": edge_py_argv, "haproxy": haproxy_argv, "nginx": nginx_argv, "caddy": caddy_argv}


@contextmanager
def proxy(name: str, work: Path, port: int, upstream_port: int, ca: Path | None, process):
    """Run proxy ``name`` on ``port`` (TLS with ``ca``'s server certificate when given)."""
    work.mkdir(parents=True, exist_ok=True)
    argv = ARGV[name](work, port, upstream_port, ca)
    scheme = "https" if ca else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    env = {"GOMAXPROCS": "1", "HOME": str(work), "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work)}
    with process(argv, f"{url}/health", env, verify=str(ca / "ca.pem") if ca else True) as proc:
        yield url, proc.pid
