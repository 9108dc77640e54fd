"""``fab provision --env ENV``: run utils/init_vm.sh as root on every host of an environment.

Hosts are provisioned in parallel, each over SSH as ``--admin-user`` (root by default; another
user needs passwordless sudo) with the host key checked against known_hosts. The deploy user's
password and public key (``GITLAB_PASSWORD``, ``GITLAB_SSH_PUBLIC_KEY``) travel on stdin.
``--dry-run`` connects and runs every check but changes nothing: it prints what would change.
"""

from __future__ import annotations

from invoke import task
from invoke.exceptions import Exit


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
    """Provision hosts: packages, NVIDIA stack, deploy user (no sudo rights), storage (idempotent)."""
    # Imported here, not at the top: `fab --list` and the other tasks do not pay for them.
    import os
    from pathlib import Path

    from pyalbert.config import load_spec
    from pyalbert.engine.fanout import ssh_runners
    from pyalbert.engine.provision import provision_hosts
    from pyalbert.engine.report import print_summary
    from pyalbert.entry import exit_code
    from pyalbert.errors import RemoteError
    from pyalbert.remote import SshMaterial

    def run() -> None:
        spec = load_spec(env, Path(config_dir) if config_dir else None)
        outcomes = provision_hosts(
            spec, admin_user=admin_user, dry_run=dry_run, gpu=gpu, user=user, environ=os.environ,
            runners=ssh_runners(spec, SshMaterial.from_environ(spec.env.ssh)))
        failed = print_summary(outcomes, "provision")
        if failed:
            raise RemoteError(f"provision failed on {failed} of {len(outcomes)} host(s)")

    code = exit_code(run)
    if code:
        raise Exit(code=code)
