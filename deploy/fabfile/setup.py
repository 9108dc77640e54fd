"""``fab setup --env ENV [--service vllm|api|all]``: download models and build the whitelist on
the hosts, with the tools of this repo installed there (:mod:`pyalbert.setup_stage`).
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
    from pyalbert.errors import AlbertError
    from pyalbert.fleet import print_summary
    from pyalbert.setup_stage import setup_env

    try:
        spec = load_spec(env, Path(config_dir) if config_dir else None)
        outcomes = setup_env(spec, service=service, dry_run=dry_run)
    except AlbertError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    failed = print_summary(outcomes, "setup")
    if failed:
        raise Exit(f"setup failed on {failed} of {len(spec.env.hosts)} host(s)", code=3)
