"""``fab setup --env ENV [--service vllm|api|all]``: download models and build the whitelist on
the hosts, with the tools of this repo installed there (:mod:`pyalbert.engine.setup`).
"""

from __future__ import annotations

from invoke import task
from invoke.exceptions import Exit


@task(
    help={
        "env": "environment (config/environments/ENV.toml)",
        "service": "vllm (download models), api (whitelist) or all (default)",
        "dry_run": "probe the hosts, print what would be uploaded and run; change nothing",
        "config_dir": "config folder (default: ./config or $ALBERT_CONFIG_DIR)",
    }
)
def setup(c, env, service="all", dry_run=False, config_dir=None):
    """Install the tools on the hosts, upload the config, download models, build the whitelist."""
    # Imported here, not at the top: `fab --list` and the other tasks do not pay for them.
    from pathlib import Path

    from pyalbert.config import load_spec
    from pyalbert.engine.fanout import ssh_runners
    from pyalbert.engine.report import print_summary
    from pyalbert.engine.setup import setup_env
    from pyalbert.entry import exit_code
    from pyalbert.errors import RemoteError
    from pyalbert.remote import SshMaterial

    def run() -> None:
        spec = load_spec(env, Path(config_dir) if config_dir else None)
        outcomes = setup_env(spec, service=service, dry_run=dry_run,
                             runners=ssh_runners(spec, SshMaterial.from_environ(spec.env.ssh)))
        failed = print_summary(outcomes, "setup")
        if failed:
            raise RemoteError(f"setup failed on {failed} of {len(spec.env.hosts)} host(s)")

    code = exit_code(run)
    if code:
        raise Exit(code=code)
