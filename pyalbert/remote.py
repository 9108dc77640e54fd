"""The one place that executes commands: on a host over SSH (Fabric), locally, or not at all.

Everything else builds :class:`~pyalbert.commands.base.Cmd` values. A runner logs the masked
``display()`` form, sends secrets only on stdin or inside the rendered command, and turns
connection failures into one-paragraph :class:`~pyalbert.errors.AlbertError` messages.
"""

from __future__ import annotations

import functools
import io
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pyalbert.commands.base import Cmd, Raw
from pyalbert.config.environment import HostSpec, SshSpec
from pyalbert.errors import AlbertError, RemoteError


@dataclass(frozen=True)
class Result:
    cmd: Cmd
    exit_code: int
    stdout: str
    stderr: str
    #: False when nothing ran (the dry-run's recording runner): the outcome is unknown
    known: bool = True

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Runner(Protocol):
    label: str

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float | None = None) -> Result: ...


def _failed(label: str, result: Result) -> RemoteError:
    detail = (result.stderr or result.stdout).strip().splitlines()[-15:]
    text = "\n    ".join(detail) if detail else "(no output)"
    return RemoteError(
        f"on {label}: command failed with exit code {result.exit_code}: "
        f"{result.cmd.display()}\n    {text}"
    )


@dataclass
class LocalRunner:
    """Runs commands on this machine (``bash -c``)."""

    label: str = "localhost"
    env: dict[str, str] | None = None

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float | None = None) -> Result:
        try:
            proc = subprocess.run(
                ["bash", "-c", cmd.render()],
                input=cmd.stdin_text,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **(self.env or {})},
            )
        except subprocess.TimeoutExpired:
            raise RemoteError(f"on {self.label}: timed out after {timeout}s: {cmd.display()}") from None
        result = Result(cmd, proc.returncode, proc.stdout, proc.stderr)
        if check and not result.ok:
            raise _failed(self.label, result)
        return result


@dataclass
class DryRunner:
    """Connects nowhere: records what would run. Every command "succeeds" with no output and an
    unknown outcome (``Result.known`` is False): probes find nothing, checks are not judged, so the
    engine run against it sends exactly what a real run on an empty host would."""

    label: str
    commands: list[Cmd] = field(default_factory=list)

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float | None = None) -> Result:
        self.commands.append(cmd)
        return Result(cmd, 0, "", "", known=False)

    def put(self, local: str, remote: str) -> None:
        self.commands.append(Cmd((Raw(f"# upload {shlex.quote(local)} to {shlex.quote(remote)}"),)))

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SshMaterial:
    """The SSH key and known hosts a runner uses, each a path or the content itself; passed in by
    the entry point (``from_environ`` reads the variables the ``[ssh]`` section names)."""

    key: str = ""
    known_hosts: str = ""
    #: where they came from, for messages (``$SSH_PRIVATE_KEY``)
    key_source: str = "SSH_PRIVATE_KEY"
    known_hosts_source: str = "SSH_KNOWN_HOSTS"

    @classmethod
    def from_environ(cls, ssh: SshSpec, environ=None) -> SshMaterial:
        env = os.environ if environ is None else environ
        return cls(env.get(ssh.key_env, ""), env.get(ssh.known_hosts_env, ""), ssh.key_env,
                   ssh.known_hosts_env)


def _known_hosts_file(material: SshMaterial) -> str:
    """known_hosts from the material (content or path), else ``~/.ssh/known_hosts``."""
    value = material.known_hosts
    if value and os.path.isfile(value):
        return value
    if value:
        return _known_hosts_from_content(value)
    return str(Path.home() / ".ssh" / "known_hosts")


@functools.lru_cache(maxsize=4)
def _known_hosts_from_content(value: str) -> str:
    """One temporary file per content and process (not one per host)."""
    with tempfile.NamedTemporaryFile("w", prefix="albert-known-hosts-", delete=False) as tmp:
        tmp.write(value if value.endswith("\n") else value + "\n")
    return tmp.name


def _private_key(material: SshMaterial) -> dict:
    """connect_kwargs for the key (path or content), else the agent."""
    value = material.key
    if not value:
        return {}
    if os.path.isfile(value):
        return {"key_filename": value, "look_for_keys": False, "allow_agent": False}
    return dict(_key_from_content(value, material.key_source))  # a copy: Connection may add to it


@functools.lru_cache(maxsize=4)
def _key_from_content(value: str, key_env: str) -> dict:
    """Parsed once per process: every host's connection shares the key (read-only)."""
    import paramiko

    text = value if value.endswith("\n") else value + "\n"
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return {"pkey": kind.from_private_key(io.StringIO(text)), "look_for_keys": False,
                    "allow_agent": False}
        except (paramiko.SSHException, ValueError):
            continue
    raise AlbertError(
        f"${key_env} is neither a readable file nor a private key in OpenSSH/PEM form. "
        f"Fix: set it as a GitLab 'File' variable holding the key, or unset it to use ssh-agent."
    )


@dataclass
class SSHRunner:
    """Runs commands on a host as its SSH user, host key checked against known_hosts."""

    host: HostSpec
    ssh: SshSpec = field(default_factory=SshSpec)
    #: key and known hosts (default: read now from the variables ``ssh`` names)
    material: SshMaterial | None = None
    _conn: object | None = None

    def __post_init__(self) -> None:
        if self.material is None:
            self.material = SshMaterial.from_environ(self.ssh)

    @property
    def label(self) -> str:
        return self.host.name

    def connection(self):
        if self._conn is None:
            import paramiko
            from fabric import Connection

            conn = Connection(
                self.host.address,
                user=self.host.user,
                port=self.host.port,
                connect_timeout=self.ssh.connect_timeout_s,
                connect_kwargs=_private_key(self.material),
            )
            # Fabric trusts unknown hosts by default; we never do.
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            known = _known_hosts_file(self.material)
            if os.path.isfile(known):
                conn.client.load_host_keys(known)
            self._open(conn, known)
            self._conn = conn
        return self._conn

    def _open(self, conn, known: str) -> None:
        import paramiko

        where = f"host {self.host.name} ({self.host.user}@{self.host.address}:{self.host.port})"
        try:
            conn.open()
        except paramiko.AuthenticationException:
            raise AlbertError(
                f"{where} rejected the SSH key. Fix: add the public key of ${self.ssh.key_env} "
                f"to ~{self.host.user}/.ssh/authorized_keys on the host (run provision), or set "
                f"${self.ssh.key_env} to the right key."
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc) or "known_hosts" in str(exc):
                raise AlbertError(
                    f"{where} presented a host key that is not in known_hosts ({known}). Fix: add "
                    f"its key (ssh-keyscan -p {self.host.port} {self.host.address}, checked out of "
                    f"band) to ${self.ssh.known_hosts_env} or ~/.ssh/known_hosts."
                ) from None
            raise AlbertError(f"{where}: SSH failed: {exc}") from None
        except (TimeoutError, OSError) as exc:
            raise AlbertError(
                f"{where} is unreachable ({exc.__class__.__name__}: {exc}). Fix: check the address "
                f"and port in the environment file, the network, and that sshd runs."
            ) from None

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float | None = None) -> Result:
        conn = self.connection()
        stdin = cmd.stdin_text
        if stdin is not None:
            result = self._run_with_stdin(conn, cmd, stdin, timeout)
        else:
            res = conn.run(cmd.render(), hide=True, warn=True, in_stream=False, timeout=timeout)
            result = Result(cmd, res.exited, res.stdout, res.stderr)
        if check and not result.ok:
            raise _failed(self.label, result)
        return result

    def _run_with_stdin(self, conn, cmd: Cmd, stdin: str, timeout: float | None) -> Result:
        """Send ``stdin`` then EOF on a plain channel (invoke's stdin thread can lose the EOF
        of larger payloads and leave ``cat`` waiting)."""
        chan = conn.client.get_transport().open_session()
        try:
            chan.settimeout(timeout)
            chan.exec_command(cmd.render())
            chan.sendall(stdin.encode())
            chan.shutdown_write()
            out = chan.makefile("rb").read().decode(errors="replace")
            err = chan.makefile_stderr("rb").read().decode(errors="replace")
            code = chan.recv_exit_status()
        except TimeoutError:
            raise RemoteError(f"on {self.label}: timed out after {timeout}s: {cmd.display()}") from None
        finally:
            chan.close()
        return Result(cmd, code, out, err)

    def stream(self, cmd: Cmd, prefix: str = "") -> int:
        """Run and print output as it comes (``logs -f``); returns the exit code."""
        res = self.connection().run(cmd.render(), warn=True, in_stream=False, pty=False)
        return res.exited

    def put(self, local: str, remote: str) -> None:
        self.connection().put(local, remote)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()  # type: ignore[attr-defined]
            self._conn = None
