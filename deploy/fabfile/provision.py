"""``fab provision --env ENV``: run utils/init_vm.sh as root on every host of an environment.

Hosts are provisioned in parallel, each over SSH as ``--admin-user`` (root by default; another
user needs passwordless sudo) with the host key checked against known_hosts. The deploy user's
password and public key (``GITLAB_PASSWORD``, ``GITLAB_SSH_PUBLIC_KEY``) travel on stdin.
``--dry-run`` connects and runs every check but changes nothing: it prints what would change.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from invoke import task
from invoke.exceptions import Exit
from rich.markup import escape

from pyalbert.commands.provision import (
    InitVmReport,
    init_vm,
    parse_init_vm,
    provision_secrets,
    read_script,
)
from pyalbert.config import load_spec
from pyalbert.config.environment import HostSpec
from pyalbert.errors import AlbertError
from pyalbert.remote import SSHRunner
from pyalbert.ui import console

T = TypeVar("T")


@dataclass
class HostOutcome:
    host: str
    value: object = None
    error: BaseException | None = None
    seconds: float = 0.0


def on_hosts(hosts: Sequence[HostSpec], work: Callable[[HostSpec], T]) -> list[HostOutcome]:
    """Run ``work(host)`` for every host at once; one outcome per host, in the hosts' order."""

    def one(host: HostSpec) -> HostOutcome:
        start = time.monotonic()
        try:
            return HostOutcome(host.name, work(host), None, time.monotonic() - start)
        except Exception as exc:  # reported per host; the others go on
            return HostOutcome(host.name, None, exc, time.monotonic() - start)

    if len(hosts) == 1:
        return [one(hosts[0])]
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        return list(pool.map(one, hosts))


def provision_hosts(spec, *, admin_user: str = "root", dry_run: bool = False, gpu: str = "auto",
                    user: str = "gitlab", environ=None) -> list[HostOutcome]:
    """Provision every host of ``spec``; each outcome's value is an :class:`InitVmReport`."""
    if gpu not in ("auto", "yes", "no"):
        raise AlbertError(f"--gpu must be auto, yes or no, not {gpu!r}")
    secrets = provision_secrets(environ)  # missing variables: fail before any connection
    script = read_script()
    env = spec.env

    def work(host: HostSpec) -> InitVmReport:
        cmd = init_vm(script, secrets, user=user, storage_dir=env.storage_dir, gpu=gpu,  # type: ignore[arg-type]
                      dry_run=dry_run, as_root=admin_user == "root")
        runner = SSHRunner(host.model_copy(update={"user": admin_user}), env.ssh)
        try:
            result = runner.run(cmd, timeout=1800)
        finally:
            runner.close()
        report = parse_init_vm(result.stdout)
        for line in report.changed:
            console.print(f"[bold]\\[{host.name}][/] changed: {escape(line)}", soft_wrap=True)
        for line in report.would_change:
            console.print(f"[bold]\\[{host.name}][/] would change: {escape(line)}", soft_wrap=True)
        return report

    return on_hosts(env.hosts, work)


def print_summary(outcomes: Sequence[HostOutcome], what: str) -> int:
    """One line per host; returns the number of failed hosts."""
    failed = 0
    for o in outcomes:
        if o.error is not None:
            failed += 1
            console.print(f"[red]✗ {o.host}[/] {what} failed ({o.seconds:.1f}s): {escape(str(o.error))}",
                          soft_wrap=True)
        else:
            summary = o.value.summary() if hasattr(o.value, "summary") else str(o.value)
            console.print(f"[green]✓ {o.host}[/] {escape(summary)} ({o.seconds:.1f}s)", soft_wrap=True)
    return failed


@task(
    help={
        "env": "environment (config/environments/ENV.toml)",
        "admin_user": "SSH user with root rights on the hosts (default: root)",
        "dry_run": "check everything, change nothing, print what would change",
        "gpu": "NVIDIA driver/toolkit: auto (when a GPU is present), yes or no",
        "user": "deploy user to create (default: gitlab)",
        "config_dir": "config folder (default: ./config or $ALBERT_CONFIG_DIR)",
    }
)
def provision(c, env, admin_user="root", dry_run=False, gpu="auto", user="gitlab", config_dir=None):
    """Provision hosts: packages, NVIDIA stack, deploy user, sudo rules, storage (idempotent)."""
    try:
        spec = load_spec(env, Path(config_dir) if config_dir else None)
        outcomes = provision_hosts(spec, admin_user=admin_user, dry_run=dry_run, gpu=gpu,
                                   user=user, environ=os.environ)
    except AlbertError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    failed = print_summary(outcomes, "provision")
    if failed:
        raise Exit(f"provision failed on {failed} of {len(outcomes)} host(s)", code=3)
