"""Readiness and host probes: a command plus a pure parser of its output.

The probes run *on the host* (over SSH), so a firewall between the deploy box and the model ports
does not matter, and ``127.0.0.1`` reaches what the container publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pyalbert.commands.base import Cmd, Op, any_of, pipe


def http_status(url: str, timeout_s: float = 3) -> Cmd:
    """``curl`` printing only the HTTP status; ``000`` when the connection is refused. An
    ``https://`` URL on the host itself (the front door by its address, not the certificate's
    name) is asked without checking the certificate: the question is whether it answers."""
    insecure = "-k" if url.startswith("https://") else None
    return any_of(
        Cmd.of("curl", "-s", insecure, "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
               f"{timeout_s:g}", url),
        Cmd.of("true"),
    )


def parse_status(stdout: str) -> int:
    text = stdout.strip()[-3:]
    return int(text) if text.isdigit() else 0


def get_json(url: str, timeout_s: float = 3, header_file: str | None = None) -> Cmd:
    """``curl`` the body of ``url``; ``header_file`` holds headers (``-H @FILE``: a key stays off
    the command line)."""
    header = ("-H", f"@{header_file}") if header_file else ()
    return any_of(Cmd.of("curl", "-s", "--max-time", f"{timeout_s:g}", *header, url), Cmd.of("true"))


#: what :func:`http_call` prints after the body: the status on a line of its own
STATUS_MARK = "\n@albert-http-status "


def http_call(method: str, url: str, *, body: str | None = None, header_file: str | None = None,
              timeout_s: float = 60) -> Cmd:
    """One HTTP call made *on the host* (``albert smoke vllm``: servers listen on the host's
    loopback or private address). Prints the body, then :data:`STATUS_MARK` and the status
    (``000``: no connection); the key comes from ``header_file`` (``-H @FILE``) and the body on
    stdin, so neither is on the command line."""
    return Cmd.of(
        "curl", "-s", "-S", "--max-time", f"{timeout_s:g}", "-X", method,
        ("-H", f"@{header_file}") if header_file else None,
        ("-H", "Content-Type: application/json", "--data-binary", "@-") if body is not None else None,
        "-w", STATUS_MARK.replace("\n", "\\n") + "%{http_code}", url,
        stdin=body,
    )


def parse_http_call(stdout: str) -> tuple[int, str]:
    """``(status, body)`` of :func:`http_call`'s output; status 0 when nothing answered."""
    body, mark, status = stdout.rpartition(STATUS_MARK)
    if not mark:
        return 0, stdout
    code = status.strip()
    return (int(code) if code.isdigit() else 0), body


def models_listed(stdout: str) -> list[str]:
    """Model ids of an OpenAI ``/v1/models`` answer; [] for anything else."""
    try:
        data = json.loads(stdout)
        return [str(m["id"]) for m in data.get("data", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


def parse_models_once_healthy(stdout: str) -> tuple[int, list[str]]:
    """``(/health status, model ids listed)`` of :meth:`ReadyCheck.models_once_healthy`."""
    first, _, body = stdout.partition("\n")
    if not first.startswith("@health "):
        return 0, []
    return parse_status(first), models_listed(body)


@dataclass(frozen=True)
class ReadyCheck:
    """How to tell a server is ready: ``/health`` is 200, then ``/v1/models`` lists ``model``."""

    port: int
    model: str | None = None
    host: str = "127.0.0.1"
    #: a curl header file with the server's key (``/v1/*`` needs it, ``/health`` does not)
    header_file: str | None = None
    #: answers 200 once the server is up (Prometheus: ``/-/ready``)
    path: str = "/health"
    #: ``https``: the front door with TLS (``[edge] tls``)
    scheme: str = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def health(self) -> Cmd:
        return http_status(f"{self.base}{self.path}")

    def models(self) -> Cmd:
        return get_json(f"{self.base}/v1/models", header_file=self.header_file)

    def models_once_healthy(self, within_s: float) -> Cmd:
        """On the host: poll ``/health`` every 20 ms for at most ``within_s``; once it is 200,
        print ``@health 200`` and the ``/v1/models`` body (:func:`parse_models_once_healthy`).
        One call instead of a poll per round trip: a model out of service is seen ready within
        ~20 ms, not within an SSH poll interval plus two round trips."""
        script = (
            'end=$(( $(date +%s%N) / 1000000 + $1 )); '
            'while :; do '
            'code=$(curl -s -o /dev/null -w "%{http_code}" --max-time 1 "$2"); '
            'if [ "$code" = 200 ]; then echo "@health 200"; '
            'if [ -n "$4" ]; then exec curl -s --max-time 3 -H "@$4" "$3"; fi; '
            'exec curl -s --max-time 3 "$3"; fi; '
            'if [ "$(( $(date +%s%N) / 1000000 ))" -ge "$end" ]; then echo "@health $code"; exit 0; fi; '
            'sleep 0.02; done')
        return Cmd.of("sh", "-c", script, "ready", str(round(within_s * 1000)),
                      f"{self.base}{self.path}", f"{self.base}/v1/models", self.header_file or "")

    def display(self) -> str:
        what = f", /v1/models lists {self.model}" if self.model else ""
        return f"wait until {self.base}{self.path} is 200{what}"


def port_listeners(port: int) -> Cmd:
    """Probe: sockets listening on TCP ``port`` (with owning process when permitted)."""
    return Cmd.of("ss", "-Hltnp", f"sport = :{port}")


def free_kib(path: str) -> Cmd:
    """Free space (KiB) of the filesystem holding ``path`` (its nearest existing parent)."""
    script = ('p="$1"; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; '
              'df -Pk "$p" | tail -n 1')
    return Cmd.of("sh", "-c", script, "free_kib", path)


def parse_free_kib(stdout: str) -> int:
    """Available KiB from one ``df -Pk`` data line."""
    fields = stdout.split()
    return int(fields[3]) if len(fields) >= 4 and fields[3].isdigit() else 0


def dir_size_kib(path: str) -> Cmd:
    """KiB used by ``path`` (0 when absent)."""
    return any_of(pipe(Cmd.of("du", "-sk", path, Op("2>/dev/null")), Cmd.of("cut", "-f1")),
                  Cmd.of("echo", "0"))


def path_exists(path: str) -> Cmd:
    return Cmd.of("test", "-e", path)
