"""Provisioning a host: run ``utils/init_vm.sh`` as root, secrets on stdin, and read its report.

The script travels on the command's stdin (``bash -s``), preceded by two shell assignments that
hold the secrets, so neither the password nor the key is ever in an argv, a file on the host or a
log: ``display()`` shows ``sudo -n bash -s -- ... <<< [secret, N bytes]``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyalbert.commands.base import Cmd, Secret, sudo
from pyalbert.errors import AlbertError

INIT_VM = Path(__file__).resolve().parents[2] / "utils" / "init_vm.sh"
PASSWORD_ENV = "GITLAB_PASSWORD"
PUBLIC_KEY_ENV = "GITLAB_SSH_PUBLIC_KEY"
GpuMode = Literal["auto", "yes", "no"]


@dataclass(frozen=True)
class ProvisionSecrets:
    password: Secret
    public_key: str


def provision_secrets(environ: Mapping[str, str] | None = None) -> ProvisionSecrets:
    """The deploy user's password and SSH public key from the environment (CI/CD variables).

    ``GITLAB_SSH_PUBLIC_KEY`` holds the key or, as a GitLab "File" variable, a path to it.
    Missing ones fail here, before any host is touched.
    """
    environ = os.environ if environ is None else environ
    password = environ.get(PASSWORD_ENV, "")
    key = environ.get(PUBLIC_KEY_ENV, "").strip()
    missing = [name for name, value in ((PASSWORD_ENV, password), (PUBLIC_KEY_ENV, key)) if not value]
    if missing:
        raise AlbertError(
            f"provision needs {' and '.join(missing)} in the environment: the deploy user's "
            f"password and the public half of the deploy key. Fix: define them as CI/CD variables "
            f"(masked; the key may be a File variable) or export them; no host was touched."
        )
    if "\n" not in key and os.path.isfile(key):
        key = Path(key).read_text().strip()
    if len(key.splitlines()) != 1 or not key.split()[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise AlbertError(
            f"${PUBLIC_KEY_ENV} is not one OpenSSH public key line (ssh-ed25519 AAAA... comment). "
            f"Fix: set it to the content of the deploy key's .pub file; no host was touched."
        )
    return ProvisionSecrets(Secret(password), key)


def read_script(path: Path = INIT_VM) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise AlbertError(f"cannot read {path} ({exc.strerror}). Fix: run from a checkout of the repo.") from None


def init_vm(
    script: str,
    secrets: ProvisionSecrets,
    *,
    user: str = "gitlab",
    storage_dir: str = "/data/models",
    gpu: GpuMode = "auto",
    dry_run: bool = False,
    as_root: bool = True,
    edge_port: int | None = None,
) -> Cmd:
    """``[sudo -n] bash -s -- --user U --storage-dir D [--gpu|--no-gpu] [--dry-run]
    [--edge-port N]``, script and secrets on stdin. ``edge_port``: the lowest privileged port the
    front door binds on this host (:func:`edge_low_port`)."""
    header = (
        f"{PASSWORD_ENV}={shlex.quote(secrets.password.value)}\n"
        f"{PUBLIC_KEY_ENV}={shlex.quote(secrets.public_key)}\n"
    )
    cmd = Cmd.of(
        "bash", "-s", "--", "--user", user, "--storage-dir", storage_dir,
        {"yes": "--gpu", "no": "--no-gpu"}.get(gpu), ("--dry-run" if dry_run else None),
        (["--edge-port", str(edge_port)] if edge_port else None),
        stdin=Secret(header + script),
    )
    return cmd if as_root else sudo(cmd)


def edge_low_port(api_port: int, redirect_port: int | None) -> int | None:
    """The lowest port below 1024 the front door binds (``[api] port``, ``[edge] redirect_port``):
    the deploy user runs HAProxy, so provisioning lets it bind from there (None: none is)."""
    low = [p for p in (api_port, redirect_port) if p and p < 1024]
    return min(low) if low else None


@dataclass(frozen=True)
class InitVmReport:
    """What ``init_vm.sh`` said: ``changed:`` / ``would change:`` / ``note:`` lines."""

    changed: list[str] = field(default_factory=list)
    would_change: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.changed) + len(self.would_change)

    def summary(self) -> str:
        if self.would_change:
            return f"{len(self.would_change)} change(s) would be made"
        return f"{len(self.changed)} change(s)" if self.changed else "no change"


def parse_init_vm(stdout: str) -> InitVmReport:
    report = InitVmReport()
    prefixes = (("changed: ", report.changed), ("would change: ", report.would_change),
                ("note: ", report.notes))
    for line in stdout.splitlines():
        for prefix, bucket in prefixes:
            if line.startswith(prefix):
                bucket.append(line[len(prefix):])
    return report
