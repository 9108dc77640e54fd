"""Deploy tasks: thin wrappers (parse args -> load spec -> plan -> deployer -> report).

Every task takes ``--env``; ``deploy`` also takes ``--dry-run`` (the full command plan, no
connection, secrets masked). The logic is in the engine (``pyalbert.engine``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from invoke import Exit, task


def _spec(env: str, config_dir: str | None = None):
    from pathlib import Path

    from pyalbert.config import load_spec

    return load_spec(env, Path(config_dir) if config_dir else None)


def _errors(fn):
    """The entry points' one error/exit wrapper (:func:`pyalbert.entry.exit_code`) for a task."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pyalbert.entry import exit_code

        code = exit_code(lambda: fn(*args, **kwargs))
        if code:
            raise Exit(code=code)

    return wrapper


def _ctx():
    """Who runs, the pipeline, poll and disk settings: read here, at the entry point."""
    from pyalbert.engine.context import RunContext

    return RunContext.from_environ()


def _runners(spec):
    """SSH runners with the key and known hosts of this process's environment (read here)."""
    from pyalbert.engine.fanout import ssh_runners
    from pyalbert.remote import SshMaterial

    return ssh_runners(spec, SshMaterial.from_environ(spec.env.ssh))


def _print_states(states: dict[str, str]) -> None:
    """One line per host: what the task left there."""
    for host, state in states.items():
        print(f"{host}: {state}")


_ENV = {"env": "environment name (config/environments/NAME.toml)",
        "config-dir": "config folder (default: ./config or $ALBERT_CONFIG_DIR)"}


@task(help={**_ENV, "service": "vllm, api or all (default)", "model": "only this model id",
            "dry-run": "print the command plan; connect nowhere", "message": "note in the lock",
            "check": "connect and run the preflight checks only (docker/python, disk, models, "
                     "ports); change nothing"})
@_errors
def deploy(c, env, service="all", model=None, dry_run=False, message="", config_dir=None,
           check=False):
    """Deploy the routing table's vLLM servers and the api; unchanged units are not restarted."""
    from pyalbert.engine.operations import deploy_env

    if service not in ("vllm", "api", "all"):
        raise Exit(f"--service must be vllm, api or all (got {service!r})", code=2)
    spec = _spec(env, config_dir)
    deploy_env(spec, service=service, model=model, dry_run=dry_run, message=message, check=check,
               ctx=_ctx(), runners=None if dry_run else _runners(spec))


@task(help=_ENV)
@_errors
def status(c, env, config_dir=None):
    """A table per host: containers, image, release, ports, state, health, GPU memory."""
    from rich.table import Table

    from pyalbert.commands.vllm_cache import human_kib
    from pyalbert.engine.operations import status_env
    from pyalbert.errors import AlbertError
    from pyalbert.ui import console

    failed, not_serving = [], []
    spec = _spec(env, config_dir)
    for host, value in status_env(spec, _runners(spec)).items():
        if isinstance(value, AlbertError):
            console.print(f"[bold]{host}[/]: [red]{value}[/]", highlight=False)
            failed.append(host)
            continue
        cache = f"vLLM compile cache {human_kib(value['cache_kib'])}"
        if not value["rows"]:
            console.print(f"[bold]{host}[/] {value['gpus']}: no container of {env} "
                          f"(not deployed yet, or `fab down` ran); {cache}", highlight=False)
            continue
        table = Table(title=f"{host} {value['gpus']}".strip(), title_justify="left", caption=cache,
                      caption_justify="left")
        for col in ("container", "image", "release", "ports", "state", "health", "verdict"):
            table.add_column(col)
        for row in value["rows"]:
            style = "green" if row["verdict"] == "running" else "red"
            table.add_row(row["name"], row["image"], row["release"], row["ports"], row["status"],
                          row["health"], f"[{style}]{row['verdict']}[/]")
        console.print(table)
        for line in value.get("ray_nodes", []):  # a host group's cluster, on its head
            console.print(f"  {line}", highlight=False)
        not_serving.extend(f"{host} {what}" for what in value["not_serving"])
    _print_figures(spec)
    if failed:
        raise Exit(f"status: could not read {', '.join(failed)} (see above)", code=1)
    if not_serving:
        raise Exit(f"status: declared by the current release but NOT serving: {'; '.join(not_serving)}. "
                   f"Fix: read `fab logs --env {env}` for them, then redeploy or `fab rollback`.", code=1)


def _print_figures(spec) -> None:
    """The headline figures per model (Prometheus, else the servers' /metrics); never fails status."""
    from pyalbert.cli.top_cmd import table
    from pyalbert.engine.status_figures import status_figures
    from pyalbert.errors import AlbertError
    from pyalbert.ui import console

    try:
        source, rows = status_figures(spec, _runners(spec))
    except AlbertError as exc:
        console.print(f"[yellow]figures per model: {exc}[/]", highlight=False)
        return
    console.print(table(rows, source, title="figures per model"))


@task(help={**_ENV, "service": "vllm, api or ray (a host group's nodes)", "model": "model id",
            "n": "lines",
            "follow": "keep streaming"})
@_errors
def logs(c, env, service="vllm", model=None, n=100, follow=False, config_dir=None):
    """Last lines of a service's container logs on every host running it."""
    from pyalbert.engine.operations import logs_env

    spec = _spec(env, config_dir)
    found, hosts = logs_env(spec, service, model, int(n), follow, _runners(spec))
    if not any(found.values()):
        what = f"{service} {model}" if model else service
        raise Exit(f"no running {what} container of {env} on {', '.join(h.name for h in hosts)}. "
                   f"Fix: check `fab status --env {env}`, then deploy.", code=1)


@task(help={**_ENV, "to": "release id (default: the one before the current)"})
@_errors
def rollback(c, env, to=None, config_dir=None):
    """Go back to a kept release (restarts only what differs)."""
    from pyalbert.engine.operations import rollback_env

    spec = _spec(env, config_dir)
    rollback_env(spec, to=to, runners=_runners(spec), ctx=_ctx())


@task(help=_ENV)
@_errors
def releases(c, env, config_dir=None):
    """Releases kept on each host, the current one marked."""
    from pyalbert.engine.operations import list_releases
    from pyalbert.ui import console

    spec = _spec(env, config_dir)
    for host, (current, items) in list_releases(spec, _runners(spec)).items():
        console.print(f"[bold]{host}[/]")
        for item in items:
            mark = "*" if item["id"] == current else " "
            console.print(f"  {mark} {item['id']}  {item['created']}  {item['who']}  "
                          f"{item['units']} unit(s)", highlight=False)
        if not items:
            console.print("    (none)")


@task(help={**_ENV, "message": "why (shown to whoever tries to deploy)"})
@_errors
def lock(c, env, message="", config_dir=None):
    """Take the deploy lock on every host of the environment."""
    from pyalbert.engine.operations import lock_env

    spec = _spec(env, config_dir)
    lock_env(spec, message, _runners(spec), ctx=_ctx())
    print(f"locked {env}")


@task(help=_ENV)
@_errors
def unlock(c, env, config_dir=None):
    """Release the deploy lock on every host (idempotent)."""
    from pyalbert.engine.operations import unlock_env

    spec = _spec(env, config_dir)
    _print_states(unlock_env(spec, _runners(spec)))


@task(name="link-gpu", help=_ENV)
@_errors
def link_gpu(c, env, config_dir=None):
    """Take this pipeline's lease on the shared GPU host (refuses while another holds it)."""
    from pyalbert.engine.gpu_lease import link_gpu_env as link

    spec = _spec(env, config_dir)
    _print_states(link(spec, _runners(spec), ctx=_ctx()))


@task(name="unlink-gpu", help=_ENV)
@_errors
def unlink_gpu(c, env, config_dir=None):
    """Stop this env's vLLM containers and release the GPU lease (idempotent)."""
    from pyalbert.engine.gpu_lease import unlink_gpu_env as unlink

    spec = _spec(env, config_dir)
    _print_states(unlink(spec, _runners(spec), ctx=_ctx()))


@task(help=_ENV)
@_errors
def smoke(c, env, config_dir=None):
    """Run `albert smoke` against the environment."""
    argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "smoke", "--env", env]
    if config_dir:
        argv += ["--config-dir", config_dir]
    code = subprocess.call(argv, env=os.environ.copy())
    if code:
        raise Exit(code=code)


@task(help={**_ENV, "purge_cache": "also empty vLLM's compile cache (the next starts are cold)"})
@_errors
def down(c, env, config_dir=None, purge_cache=False):
    """Stop and remove every container of the environment (--purge-cache: and the compile cache)."""
    from pyalbert.commands.vllm_cache import human_kib
    from pyalbert.engine.operations import down_env, purge_cache_env

    spec = _spec(env, config_dir)
    for host, names in down_env(spec, _runners(spec)).items():
        print(f"{host}: removed {len(names)} container(s)")
    if purge_cache:
        for host, (before, after) in purge_cache_env(spec, _runners(spec)).items():
            print(f"{host}: vLLM compile cache purged ({human_kib(before)} -> {human_kib(after)})"
                  if before else f"{host}: vLLM compile cache already empty")


@task(name="renew-cert", help=_ENV)
@_errors
def renew_cert(c, env, config_dir=None):
    """Renew the front door's ACME certificate now ([edge] tls = "acme"), whatever its expiry."""
    from pyalbert.engine.edge_certificate import renew_env

    spec = _spec(env, config_dir)
    for host, note in renew_env(spec, _runners(spec)).items():
        print(f"{host}: {note}")


TASKS = (deploy, status, logs, rollback, releases, lock, unlock, link_gpu, unlink_gpu, smoke, down,
         renew_cert)
