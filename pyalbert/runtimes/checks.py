"""Preflight checks as types: each knows its command and judges its own result.

A check's ``judge(result, host)`` returns the problem sentence (what is wrong, and the fix) or
None; nothing parses a display string back into data. A result whose outcome is unknown (the
dry-run's recording runner) is no problem: the check is shown, not judged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyalbert.commands import docker, health, process
from pyalbert.commands.base import Cmd
from pyalbert.remote import Result


@dataclass(frozen=True)
class HostFacts:
    """What a verdict may name or ask about the host being checked."""

    user: str
    env: str
    base_dir: str
    #: names of this env's units running on the host (asked only when a verdict needs it)
    running_units: Callable[[], set[str]]


class Check:
    """Base of the typed checks: ``what`` (shown), ``cmd`` (run), ``judge`` (the verdict)."""

    #: a failed check that makes the others meaningless (no docker: no port owner to ask)
    blocking: ClassVar[bool] = False
    what: str

    @property
    def cmd(self) -> Cmd:
        raise NotImplementedError

    def judge(self, res: Result, host: HostFacts) -> str | None:
        raise NotImplementedError

    def verdict(self, res: Result, host: HostFacts) -> str | None:
        return self.judge(res, host) if res.known else None


def docker_problem(code: int, output: str, user: str, env: str) -> str | None:
    """What ``docker version`` failing says: not installed, no access, or daemon down."""
    if code == 0:
        return None
    text = output.lower()
    fix = f"Fix: run `fab provision --env {env}`"
    if code == 127 or "command not found" in text or "docker: not found" in text:
        return (f"docker is not installed (the `docker` command is not found for user {user}). "
                f"{fix}: it installs Docker.")
    if "permission denied" in text:
        return (f"user {user} may not use docker (permission denied on the docker socket: not in "
                f"the docker group). {fix}: it adds {user} to the docker group.")
    if "cannot connect to the docker daemon" in text or "is the docker daemon running" in text:
        return (f"the docker daemon is not running. {fix}, or start it on the host "
                "(`sudo systemctl start docker`).")
    last = output.strip().splitlines()[-1:] or ["no output"]
    return (f"docker does not answer (exit {code}: {last[0][:200]}). {fix}: it installs and "
            "starts Docker and gives the user access to it.")


@dataclass(frozen=True)
class DockerAnswers(Check):
    blocking: ClassVar[bool] = True
    what: str = "docker answers"

    @property
    def cmd(self) -> Cmd:
        return docker.server_version()

    def judge(self, res: Result, host: HostFacts) -> str | None:
        return docker_problem(res.exit_code, res.stderr + "\n" + res.stdout, host.user, host.env)


@dataclass(frozen=True)
class ToolsInstalled(Check):
    albert: str

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"the tools venv is installed ({self.albert})"

    @property
    def cmd(self) -> Cmd:
        return health.path_exists(self.albert)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        if res.ok:
            return None
        return (f"the tools venv is not on the host ({self.albert}). Fix: run "
                f"`fab setup --env {host.env}`: it installs pyalbert there.")


@dataclass(frozen=True)
class PythonAtLeast(Check):
    python: str
    minimum: tuple[int, int]

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"Python {'.'.join(map(str, self.minimum))}+ for vLLM ({self.python})"

    @property
    def cmd(self) -> Cmd:
        return process.python_version(self.python)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        found = process.parse_python_version(res.stdout) if res.ok else None
        if found is not None and found >= self.minimum:
            return None
        wanted = ".".join(map(str, self.minimum))
        got = (f"is Python {'.'.join(map(str, found))}" if found else
               "was not found on the host (or does not run)")
        return (f"{self.python} {got}, and vLLM needs Python {wanted} or newer. Fix: install "
                "python3.10+ with its venv module (fab provision does), or set vllm.python in the "
                "environment file.")


@dataclass(frozen=True)
class ModelPresent(Check):
    model_id: str
    model_dir: str

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"model {self.model_id} is in {self.model_dir}"

    @property
    def cmd(self) -> Cmd:
        return health.path_exists(self.model_dir)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        if res.ok:
            return None
        return (f"model {self.model_id} is not on the host ({self.model_dir}). "
                f"Fix: run `fab setup --env {host.env}` to download it.")


@dataclass(frozen=True)
class DiskFree(Check):
    path: str
    min_mib: int

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"{self.min_mib} MiB free under {self.path}"

    @property
    def cmd(self) -> Cmd:
        return health.free_kib(self.path)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        free_mib = health.parse_free_kib(res.stdout) // 1024
        if not res.ok or free_mib >= self.min_mib:
            return None
        return (f"not enough disk: {free_mib} MiB free under {self.path}, at least "
                f"{self.min_mib} MiB needed. Fix: free space (old images: docker image prune; old "
                "models under the storage dir) and deploy again.")


@dataclass(frozen=True)
class PortFree(Check):
    """The port is free, or held by ``owner`` (or a unit whose name starts with it) of this env.
    ``key``: the setting that chose the port (``[edge] acme_port``), named in the fix."""

    port: int
    owner: str
    key: str = ""

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"port {self.port} is free or ours"

    @property
    def cmd(self) -> Cmd:
        return health.port_listeners(self.port)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        text = res.stdout.strip()
        if not text:
            return None
        ours = host.running_units()
        if {n for n in ours if n == self.owner or n.startswith(self.owner)}:
            return None
        listener = text.splitlines()[0].split()[-1]
        where = (f"set another {self.key} in environments/{host.env}.toml" if self.key
                 else "change the port in the configuration")
        return (f"port {self.port} is already taken by another process ({listener}), not by "
                f"{self.owner}. Fix: stop that process, or {where}.")
