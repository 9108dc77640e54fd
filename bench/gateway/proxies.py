"""The front-door candidates of the gateway benchmark, each in front of its own gateway.

HAProxy runs the config the deploy ships (``pyalbert/templates/haproxy.cfg.j2``, one gateway as
its only server); nginx and Caddy get the closest config we would write for them (upstream
keep-alive, no buffering, X-Forwarded-For set, long timeouts). Every proxy gets one core's worth
of workers (HAProxy ``nbthread 1``, nginx ``worker_processes 1``, Caddy ``GOMAXPROCS=1``), like
the gateway. ``old_edge.py`` is the Python TCP forwarder the proxy replaced, measured for
reference. Each context manager yields (url, proxy pid).

HAProxy variants, to measure a tuning before it goes into the template, side by side:
``haproxy@REV`` renders the template as it was at git revision REV (the "before" of a change),
``haproxy~TWEAK`` applies one of :data:`TWEAKS` to the rendered config (several: ``~a~b``); both
combine with ``+tls``. HAProxy reaches its gateway as the deploy ships it: over the gateway's
unix socket (``albert api --uds``, the server ``unix@`` that socket); ``~tcp`` is the same over
loopback TCP (the gateway's port: what shipped before), for comparison.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pyalbert.commands import edge
from pyalbert.commands.render import _jinja

HERE = Path(__file__).resolve().parent
PROXIES = ("edge.py", "haproxy", "nginx", "caddy")
BINARIES = {"haproxy": edge.HAPROXY_BIN, "nginx": "/usr/sbin/nginx", "caddy": "/usr/bin/caddy"}


def _global(line: str):
    return lambda cfg: cfg.replace("\nglobal\n", f"\nglobal\n    {line}\n", 1)


def _defaults(line: str):
    return lambda cfg: cfg.replace("\ndefaults\n", f"\ndefaults\n    {line}\n", 1)


#: candidate tunings of the rendered config (name -> text edit), measured as ``haproxy~NAME``
TWEAKS = {
    "nodelay": _defaults("option http-no-delay"),
    "splice": _defaults("option splice-auto"),
    "reuse-always": lambda cfg: cfg.replace("http-reuse safe", "http-reuse always"),
    "buf16k": lambda cfg: re.sub(r"tune\.bufsize \d+", "tune.bufsize 16384", cfg),
    "chk5s": lambda cfg: cfg.replace("check inter 1s", "check inter 5s"),
    "nochk": lambda cfg: re.sub(r" check inter .*", "", cfg),
    "forwardfor": lambda cfg: cfg.replace(
        "    http-request set-header X-Forwarded-For %[src]\n",
        "    http-request del-header X-Forwarded-For\n    option forwardfor\n"),
    "norules": lambda cfg: re.sub(r"    http-(request|response) (deny|set-header).*\n", "", cfg),
    "lowlat": _global("tune.sched.low-latency on"),
    "maxpoll": _global("tune.maxpollevents 64"),
    "recvenough": _global("tune.recv_enough 1024"),
    "idlepool": _global("tune.idle-pool.shared off"),
    "threads2": lambda cfg: re.sub(r"nbthread \d+", "nbthread 2", cfg),
}


#: ``haproxy~tcp``: HAProxy reaches its gateway over loopback TCP instead of its unix socket
TCP = "tcp"


def tweaks(target: str) -> list[str]:
    return re.findall(r"~([^~@+]+)", target)


def uses_uds(target: str) -> bool:
    """HAProxy's targets reach the gateway over its unix socket, unless ``~tcp``."""
    return base_name(target) == "haproxy" and TCP not in tweaks(target)


def base_name(target: str) -> str:
    """``haproxy@abc~nodelay+tls`` -> ``haproxy``."""
    return re.split(r"[@~+]", target, maxsplit=1)[0]


def missing(name: str) -> str:
    """Why proxy ``name`` cannot run here ("" when it can)."""
    binary = BINARIES.get(base_name(name))
    if binary and not shutil.which(binary):
        return f"{binary} not installed (./scripts/bootstrap installs it)"
    unknown = [t for t in tweaks(name) if t not in TWEAKS and t != TCP]
    if unknown:
        return f"unknown tweak {', '.join(unknown)} (known: {', '.join(TWEAKS)})"
    return ""


def haproxy_config(variant: str, config: edge.EdgeConfig) -> str:
    """The config of ``variant`` (``@REV``: the template at that git revision; ``~TWEAK``...)."""
    rev = re.search(r"@([^~+]+)", variant)
    if rev:
        text = subprocess.run(["git", "show", f"{rev.group(1)}:pyalbert/templates/haproxy.cfg.j2"],
                              cwd=HERE, check=True, capture_output=True, text=True).stdout
        # templates before the unix socket wrote "127.0.0.1:<port>" around the server's address
        cfg = _jinja().from_string(text).render(c=config).replace("127.0.0.1:unix@", "unix@")
        cfg = re.sub(r"127\.0\.0\.1:127\.0\.0\.1:", "127.0.0.1:", cfg)
    else:
        cfg = edge.render_config(config)
    for tweak in tweaks(variant):
        if tweak == TCP:
            continue
        changed = TWEAKS[tweak](cfg)
        if changed == cfg:
            raise RuntimeError(f"tweak {tweak} changes nothing in this config")
        cfg = changed
    return cfg


def haproxy_argv(work: Path, port: int, upstream_port: int, ca: Path | None,
                 variant: str = "haproxy", uds: Path | None = None) -> list[str]:
    server = f"unix@{uds}" if uds else f"127.0.0.1:{upstream_port}"
    config = edge.EdgeConfig(env="bench", port=port, servers=(("gateway", server),),
                             socket=str(work / "haproxy.sock"), state_file=str(work / "state"),
                             address="127.0.0.1", tls_pem=str(ca / "server.pem") if ca else None)
    (work / "haproxy.cfg").write_text(haproxy_config(variant, config))
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
def proxy(name: str, work: Path, port: int, upstream_port: int, ca: Path | None, process,
          uds: Path | None = None):
    """Run proxy ``name`` (a HAProxy variant too) on ``port`` (TLS with ``ca``'s server
    certificate when given; ``uds``: the gateway's unix socket instead of ``upstream_port``)."""
    work.mkdir(parents=True, exist_ok=True)
    if base_name(name) == "haproxy":
        argv = haproxy_argv(work, port, upstream_port, ca, name, uds)
    else:
        argv = ARGV[name](work, port, upstream_port, ca)
    scheme = "https" if ca else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    env = {"GOMAXPROCS": "1", "HOME": str(work), "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work)}
    with process(argv, f"{url}/health", env, verify=str(ca / "ca.pem") if ca else True) as proc:
        yield url, proc.pid
