"""The api's front door: HAProxy in front of the blue/green gateways (pure builders).

The config is rendered from the environment (``haproxy.cfg.j2``) and checked with ``haproxy -c``
before anything changes. HAProxy runs in master-worker mode (``-W -db``, foreground under the
supervisor or in a container): ``SIGUSR2`` reloads it gracefully (the old worker finishes its
connections). The blue/green switch is a runtime-API change on the stats socket: the new colour is
made ``ready`` and the old one ``maint`` in one batch, so new requests reach the new colour at
once while requests in flight on the old one finish; the servers' state is saved to the
``server-state-file`` so that a reload keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyalbert.commands.base import Cmd
from pyalbert.commands.render import render

#: Debian's package (``./scripts/bootstrap``, ``utils/init_vm.sh``)
HAPROXY_BIN = "/usr/sbin/haproxy"
BACKEND = "api"
#: sends ';'-joined runtime-API commands (argv[2]) to the stats socket (argv[1]), prints the answer;
#: with argv[3] (state file) argv[4] (upstream file) argv[5] (port): saves the servers' state
#: and the live port there (write then rename); exits 1 when HAProxy answers an error
RUNTIME_API = (
    "import os,socket,sys\n"
    "import time\n"
    "def ask(q):\n"
    " s=socket.socket(socket.AF_UNIX);s.settimeout(10)\n"
    " for i in range(100):\n"  # a worker just started or reloaded binds the socket in a moment
    "  try:\n"
    "   s.connect(sys.argv[1]);break\n"
    "  except OSError:\n"
    "   if i==99:raise\n"
    "   time.sleep(0.1)\n"
    " s.sendall(q.encode()+b'\\n')\n"
    " out=b''\n"
    " while (b:=s.recv(65536)):out+=b\n"
    " return out.decode()\n"
    "out=ask(sys.argv[2]);sys.stdout.write(out)\n"
    "bad=[l for l in out.splitlines() if l and not l.startswith('#') and ('No such' in l or 'Require' in l"
    " or 'Unknown' in l or 'invalid' in l.lower())]\n"
    "if bad:sys.exit(1)\n"
    "def put(p,t):\n"
    " open(p+'.tmp','w').write(t);os.replace(p+'.tmp',p)\n"
    "if len(sys.argv)>3:put(sys.argv[3],ask('show servers state "
    + BACKEND + "'));put(sys.argv[4],sys.argv[5]+'\\n')\n"
)


@dataclass(frozen=True)
class EdgeConfig:
    """What the HAProxy config is rendered from (the environment's ``[api]`` and ``[edge]``)."""

    env: str
    port: int
    #: (server name, HAProxy address): the colours, ``unix@<socket>`` (or ``127.0.0.1:<port>``)
    servers: tuple[tuple[str, str], ...]
    socket: str
    state_file: str
    address: str = "0.0.0.0"
    tls_pem: str | None = None
    redirect_port: int | None = None
    max_body_bytes: int = 1_000_000
    max_header_bytes: int = 32768
    read_timeout_s: float = 30
    stream_timeout_s: int = 3600
    threads: int = 1
    maxconn: int = 4096
    #: ``[edge] tls = "acme"``: lego's loopback port for http-01 challenges, the renewal loop
    #: (HAProxy's ``program``, :func:`pyalbert.commands.acme.program_command`), the master's pidfile
    acme_port: int | None = None
    acme_program: str | None = None
    pid_file: str | None = None

    @property
    def bufsize(self) -> int:
        return self.max_header_bytes + 1024  # + tune.maxrewrite


def render_config(config: EdgeConfig) -> str:
    return render("haproxy.cfg.j2", c=config)


def serve_argv(config_file: str, binary: str = HAPROXY_BIN) -> list[str]:
    """Master-worker in the foreground: ``SIGUSR2`` reloads, ``SIGTERM`` stops."""
    return [binary, "-W", "-db", "-f", config_file]


def check(config_file: str, binary: str = HAPROXY_BIN) -> Cmd:
    """``haproxy -c``: exit 0 when HAProxy accepts the config (and its certificate)."""
    return Cmd.of(binary, "-c", "-q", "-f", config_file)


def runtime_api(socket: str, *commands: str) -> Cmd:
    return Cmd.of("python3", "-c", RUNTIME_API, socket, "; ".join(commands))


def switch(socket: str, state_file: str, upstream_file: str, target: str, port: int,
           others: tuple[str, ...]) -> Cmd:
    """New requests to ``target`` at once (``ready``), the others drain (``maint``); the state
    is saved for reloads and the live port to ``upstream_file`` (what the deploy reads back)."""
    # health up: the new colour is ready (the deploy checked) before the next health check says so
    commands = [f"set server {BACKEND}/{target} state ready", f"set server {BACKEND}/{target} health up",
                *(f"set server {BACKEND}/{o} state maint" for o in others)]
    return Cmd.of("python3", "-c", RUNTIME_API, socket, "; ".join(commands), state_file,
                  upstream_file, str(port))
