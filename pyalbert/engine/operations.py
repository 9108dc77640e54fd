"""Environment-level operations (what the entry points call): deploy, rollback, releases, lock,
unlock, down, status, logs. Each fans out over the hosts (:mod:`pyalbert.engine.fanout`).

A dry-run is the real deploy against a recording runner (:class:`pyalbert.remote.DryRunner`):
the commands printed are, by construction, the commands a run on an empty host sends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone

from pyalbert.commands import gpu, health, lock, release
from pyalbert.commands.base import Cmd
from pyalbert.config.deployment import resolved
from pyalbert.engine import edge_certificate, ray_status, unit_status, vllm_key
from pyalbert.engine.context import RunContext
from pyalbert.engine.fanout import (
    Interrupted,
    RunnerFactory,
    fan_out,
    raise_errors,
    ssh_runners,
    values,
)
from pyalbert.engine.group_gate import GroupGate
from pyalbert.engine.host import HostDeploy
from pyalbert.engine.host_plans import HostPlan, deploy_plans, release_id, units_from_manifest
from pyalbert.engine.report import HostResult, Printer, finish, interrupted_text, summary_table
from pyalbert.engine.vllm_replace import ModelRoll
from pyalbert.errors import AlbertError
from pyalbert.remote import DryRunner, Runner
from pyalbert.runtimes import facts, runtime_for
from pyalbert.runtimes.base import DeployInputs
from pyalbert.runtimes.slots import replace_settings
from pyalbert.ui import console


def new_release_id(spec, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S")
    material = {"env": spec.env.model_dump(mode="json"), "models": spec.models.model_dump(mode="json")}
    return release_id(stamp, material)


def config_files(spec) -> dict[str, str]:
    """The environment file and routing table, as the api container's config folder."""
    env_rel = f"environments/{spec.env_file.name}"
    return {env_rel: spec.env_file.read_text(), spec.env.routing_table: spec.routing_file.read_text()}


def resolve_secrets(spec) -> dict[str, str]:
    out = {}
    for key in ("hf_token", "api_keys", "tls_cert"):
        ref = spec.env.secrets.get(key)
        value = ref.resolve() if ref else None
        if value is not None:
            out[key] = value.get_secret_value()
    out["vllm_api_key"] = vllm_key.resolve(spec.env)
    return out


def run_host_plans(host_plans: Sequence[HostPlan], kind: str, runners: RunnerFactory,
                   out: Printer, ctx: RunContext, message: str = "") -> list[HostResult]:
    """``kind`` (deploy, rollback, check) on every host of ``host_plans`` at once."""
    by_host = {hp.host.name: hp for hp in host_plans}
    roll = ModelRoll(min((hp.replace.max_unavailable for hp in host_plans if hp.replace), default=1))
    gate = GroupGate.of(host_plans) if kind == "deploy" else None

    def work(runner: Runner, host, cancel) -> HostResult:
        hd = HostDeploy(runner, by_host[host.name], out, cancel, ctx, message=message,
                        runners=runners, roll=roll, gate=gate)
        return {"deploy": hd.deploy, "rollback": hd.rollback, "check": hd.check}[kind]()

    interrupted = None
    try:
        outcomes = fan_out([hp.host for hp in host_plans], work, runners,
                           on_interrupt="interrupted: rolling back and releasing locks...")
    except Interrupted as exc:
        interrupted, outcomes = exc, exc.results
    results = []
    for o in outcomes:
        if o.error is not None and not isinstance(o.error, AlbertError):
            raise o.error
        if o.error is not None:
            out(o.host, str(o.error), "red")
        results.append(o.value if o.error is None else
                       HostResult(o.host, "failed", release=by_host[o.host].release_id, error=str(o.error)))
    if interrupted is not None:
        raise Interrupted(interrupted_text(results), results)
    return results


def run_and_finish(host_plans, kind: str, title: str, runners: RunnerFactory, out: Printer,
                   ctx: RunContext, message: str = "") -> list[HostResult]:
    try:
        results = run_host_plans(host_plans, kind, runners, out, ctx, message)
    except Interrupted as exc:
        if not out.quiet:
            console.print(summary_table(exc.results, f"{title} (interrupted)"))
        raise
    return finish(results, title, out)


def deploy_env(spec, *, service: str = "all", model: str | None = None, dry_run: bool = False,
               message: str = "", runners: RunnerFactory | None = None, quiet: bool = False,
               check: bool = False, ctx: RunContext | None = None,
               release: str | None = None) -> list[HostResult]:
    """Deploy ``spec`` on its hosts in parallel; ``dry_run`` runs the same sequence against a
    recording runner and prints its commands, ``check`` runs only the preflight checks."""
    deployment = resolved(spec)
    ctx = ctx or RunContext.from_environ()
    secrets = resolve_secrets(deployment)
    if dry_run:
        secrets = {k: "***" for k in secrets}
    inputs = DeployInputs(release_id=release or new_release_id(deployment), secrets=secrets,
                          config_files=config_files(deployment), service=service, model=model)
    host_plans = deploy_plans(deployment.placement, inputs, min_free_mib=ctx.min_free_mib)
    if dry_run:
        print_dry_run(host_plans, dry_run_transcript(host_plans, ctx, message))
        return []
    out = Printer(quiet)
    factory = runners or ssh_runners(deployment)
    kind = "check" if check else "deploy"
    results = run_and_finish(host_plans, kind, "preflight" if check else "deploy", factory, out, ctx,
                             message)
    if not check and service in ("api", "all") and not model:
        edge_certificate.report_certificates(deployment, results, factory, out)
    return results


class _Transcript(Printer):
    """What the engine says during a dry-run, kept in order with the commands it sends."""

    def __init__(self, entries: dict[str, list]):
        super().__init__(quiet=True)
        self.entries = entries

    def __call__(self, host: str, text: str, style: str = "") -> None:
        self.entries[host].append(text)


def dry_run_transcript(host_plans: Sequence[HostPlan], ctx: RunContext,
                       message: str = "") -> dict[str, list[Cmd | str]]:
    """host -> what the real deploy sends to an empty host (commands) and says (text), in order;
    recorded, nothing run."""
    entries: dict[str, list] = {hp.host.name: [] for hp in host_plans}
    recorders = {name: DryRunner(name, log) for name, log in entries.items()}
    run_host_plans(host_plans, "deploy", lambda host: recorders[host.name], _Transcript(entries),
                   ctx, message)
    return entries


def dry_run_commands(host_plans: Sequence[HostPlan], ctx: RunContext,
                     message: str = "") -> dict[str, list[Cmd]]:
    """host -> the commands the real deploy sends to an empty host (recorded, nothing run)."""
    return {host: [e for e in entries if isinstance(e, Cmd)]
            for host, entries in dry_run_transcript(host_plans, ctx, message).items()}


def print_dry_run(host_plans: Sequence[HostPlan], transcript: dict[str, list[Cmd | str]]) -> None:
    console.print("[bold]dry run[/]: nothing is connected to; what a deploy sends to a host where "
                  "nothing runs yet (secrets masked; on a real host, probes skip what is unchanged)")
    for hp in host_plans:
        console.print(f"\n[bold cyan]{hp.host.name}[/] ({hp.host.user}@{hp.host.address}), "
                      f"release {hp.release_id}")
        for entry in transcript[hp.host.name]:
            if isinstance(entry, Cmd):
                console.print(f"      $ {entry.display()}", highlight=False, markup=False,
                              soft_wrap=True)
            else:
                console.print(f"  # {entry}", highlight=False, markup=False, soft_wrap=True)


def list_releases(spec, runners: RunnerFactory | None = None) -> dict[str, tuple[str, list[dict]]]:
    """host -> (current id, [manifest summaries, oldest first])."""
    base = spec.env.deploy.base_dir

    def one(r: Runner, host, cancel) -> tuple[str, list[dict]]:
        cur = release.parse_current(r.run(release.current(base), check=False).stdout)
        items = []
        for rid in release.parse_ids(r.run(release.list_ids(base)).stdout):
            res = r.run(release.read_manifest(base, rid), check=False)
            try:
                data = json.loads(res.stdout) if res.ok else {}
            except ValueError:
                data = {}
            items.append({"id": rid, "created": data.get("created", "?"), "who": data.get("who", "?"),
                          "units": len(data.get("units", [])), "manifest": data})
        return cur, items

    outcomes = fan_out(spec.env.hosts, one, runners or ssh_runners(spec))
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return {o.host: o.value for o in outcomes}


def _rollback_target(host, cur: str, items: list[dict], to: str | None, env: str) -> str:
    ids = [i["id"] for i in items]
    if to:
        if to not in ids:
            raise AlbertError(f"host {host.name} has no release {to!r}. Fix: pick one of "
                              f"{', '.join(ids)} (see `fab releases --env {env}`).")
        return to
    before = [i for i in ids if cur and i < cur]
    if not before:
        raise AlbertError(f"host {host.name} has no release before {cur or 'none'}: "
                          "nothing to roll back to. Fix: pass --to RELEASE.")
    return before[-1]


def rollback_env(spec, *, to: str | None = None, runners: RunnerFactory | None = None,
                 quiet: bool = False, ctx: RunContext | None = None) -> list[HostResult]:
    """Converge each host to release ``to`` (default: the one before the current)."""
    factory = runners or ssh_runners(spec)
    listing = list_releases(spec, factory)
    rt = runtime_for(spec.env)
    host_plans = []
    for host in spec.env.hosts:
        cur, items = listing[host.name]
        if not items:
            continue
        target = _rollback_target(host, cur, items, to, spec.env.name)
        data = next(i["manifest"] for i in items if i["id"] == target)
        host_plans.append(HostPlan(
            host=host, env=spec.env.name, base_dir=spec.env.deploy.base_dir, release_id=target,
            checks=tuple(rt.checks()), files=(), units=tuple(units_from_manifest(data, rt)),
            ready_timeout_s=spec.env.deploy.ready_timeout_s,
            keep_releases=spec.env.deploy.keep_releases, runtime=rt,
            replace=replace_settings(resolved(spec).placement)))
    if not host_plans:
        raise AlbertError(f"no host of {spec.env.name} has a release yet: deploy first.")
    return run_and_finish(host_plans, "rollback", "rollback", factory, Printer(quiet),
                          ctx or RunContext.from_environ())


def on_hosts(spec, fn, runners: RunnerFactory | None = None, hosts=None) -> dict[str, object]:
    """``fn(runner, host)`` on every host at once: host -> value, or the AlbertError it raised."""
    chosen = list(hosts if hosts is not None else spec.env.hosts)
    return values(fan_out(chosen, lambda r, host, cancel: fn(r, host), runners or ssh_runners(spec)))


def lock_env(spec, message: str = "", runners: RunnerFactory | None = None,
             ctx: RunContext | None = None) -> None:
    ctx = ctx or RunContext.from_environ()
    details = lock.details(who=ctx.who, when=ctx.now_iso(), release="(manual lock)", message=message,
                           pipeline=ctx.pipeline)
    base = spec.env.deploy.base_dir

    def one(r, host):
        if not r.run(lock.acquire(base, details), check=False).ok:
            holder = lock.describe_holder(r.run(lock.show(base), check=False).stdout)
            raise AlbertError(f"host {host.name} is already locked by {holder}.")
        return "locked"

    raise_errors(on_hosts(spec, one, runners), "lock")


def unlock_env(spec, runners: RunnerFactory | None = None,
               ctx: RunContext | None = None) -> dict[str, object]:
    """Release every host's lock; host -> ``unlocked (was held by <holder, age>)`` or
    ``was not locked``."""
    base = spec.env.deploy.base_dir
    now = (ctx or RunContext.from_environ()).clock()

    def one(r, host):
        held = r.run(lock.show(base), check=False)
        r.run(lock.release(base))
        if not held.ok:
            return "was not locked"
        return f"unlocked (was held by {lock.describe_holder(held.stdout, now=now)})"

    results = on_hosts(spec, one, runners)
    raise_errors(results, "unlock")
    return results


def down_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    """Stop and remove every unit of this environment (any service, any release)."""
    rt = runtime_for(spec.env)

    def one(r, host):
        rows = facts.units(r, rt, spec.env.name)
        for row in rows:
            r.run(rt.stop(row["name"]))
        return [row["name"] for row in rows]

    results = on_hosts(spec, one, runners)
    raise_errors(results, "down")
    return results


def purge_cache_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    """Empty vLLM's compile cache on every host: host -> (KiB before, KiB after)."""
    rt = runtime_for(spec.env)
    storage = spec.env.storage_dir

    def one(r, host):
        before = facts.cache_kib(r, storage)
        r.run(rt.purge_cache(spec.env))
        return before, facts.cache_kib(r, storage)

    results = on_hosts(spec, one, runners)
    raise_errors(results, "purge the compile cache")
    return results


def status_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    """host -> rows (unit, image, release, ports, state, health) + GPU memory."""
    rt = runtime_for(spec.env)
    ports = {model_id: (model.port, model_id) for model_id, model in spec.models}

    def one(r, host):
        rows = facts.units(r, rt, spec.env.name)
        groups = ray_status.group_status(r, rt, spec.placement, host.name) if rows else {}
        for row in rows:
            row["health"] = "-"
            if row["state"] != "running":
                continue
            if row["service"] == "ray" and row["name"] in groups:  # the group's cluster
                row["health"] = groups[row["name"]][0]
                continue
            where = "127.0.0.1"
            if row["service"] == "vllm" and row["model"] in ports:
                port, mid = ports[row["model"]]
                # where the server listens: loopback or the host's private address (issue 14)
                where = next((i.address for i in spec.placement.vllm_on(host.name)
                              if i.model_id == mid), where)
            elif row["service"] == "edge":
                port, mid = spec.env.api.port, None
            else:
                continue
            scheme = "https" if row["service"] == "edge" and spec.env.edge.tls != "off" else "http"
            check = health.ReadyCheck(port, mid, host=where, scheme=scheme)
            code = health.parse_status(r.run(check.health(), check=False).stdout)
            row["health"] = "ok" if code == 200 else f"http {code or 'refused'}"
        # nothing of this env listed: not deployed yet or `fab down` ran (not a unit that died)
        declared = _current_manifest(r, spec.env.deploy.base_dir) if rows else None
        rows, not_serving = unit_status.judge(declared, rows, now=time.time())
        gpus = ""
        if r.run(gpu.has_nvidia_smi(), check=False).ok:
            mem = gpu.parse_free_memory(r.run(gpu.free_memory(), check=False).stdout)
            gpus = ", ".join(f"GPU{i} {f}/{t} MiB free" for i, (f, t) in sorted(mem.items()))
        return {"rows": rows, "gpus": gpus, "cache_kib": facts.cache_kib(r, spec.env.storage_dir),
                "not_serving": not_serving,
                "ray_nodes": [line for _, lines in groups.values() for line in lines]}

    return on_hosts(spec, one, runners)


def _current_manifest(r, base_dir: str) -> dict | None:
    """The manifest of the release ``current`` points at (None: nothing deployed, unreadable)."""
    current = release.parse_current(r.run(release.current(base_dir), check=False).stdout)
    if not current:
        return None
    res = r.run(release.read_manifest(base_dir, current), check=False)
    try:
        return json.loads(res.stdout) if res.ok else None
    except ValueError:
        return None


def logs_env(spec, service: str, model: str | None, n: int, follow: bool,
             runners: RunnerFactory | None = None) -> tuple[dict[str, object], list]:
    """Print the last ``n`` log lines of the running units of ``service`` on every host running
    it; returns (host -> names, hosts asked)."""
    deployment = resolved(spec)
    rt = runtime_for(spec.env)

    def one(r, host):
        rows = facts.units(r, rt, spec.env.name)
        names = [row["name"] for row in rows if row["service"] == service
                 and (model is None or row["model"] == model) and row["state"] == "running"]
        for name in names:
            if follow and hasattr(r, "stream"):
                r.stream(rt.logs(name, int(n), follow=True), prefix=f"[{host.name} {name}] ")
            else:
                text = r.run(rt.logs(name, int(n))).stdout
                console.print(f"[bold cyan]== {host.name} {name}[/]")
                console.print(text, markup=False, highlight=False, end="")
        return names

    placement = deployment.placement
    hosts = [h for h in spec.env.hosts if placement.vllm_on(h.name) or placement.api_on(h.name)
             or placement.groups_on(h.name)]
    found = on_hosts(spec, one, runners, hosts=hosts)
    raise_errors(found, "logs")
    return found, hosts
