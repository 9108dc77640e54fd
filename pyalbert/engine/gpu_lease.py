"""The shared GPU host's lease (``fab link-gpu`` / ``unlink-gpu``, staging's first and last jobs).

Link takes (or renews) this pipeline's lease and refuses while another live pipeline holds it; a
takeover (expired lease) first stops the vLLM servers the dead pipeline left. Unlink stops this
env's vLLM servers, releases the lease if ours and runs the detach hook; rerunning is always safe.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pyalbert.commands import gpu
from pyalbert.config.deployment import resolved
from pyalbert.engine.context import RunContext
from pyalbert.engine.fanout import RunnerFactory, raise_errors
from pyalbert.engine.operations import on_hosts
from pyalbert.errors import AlbertError
from pyalbert.observability import commands as oc
from pyalbert.remote import Runner
from pyalbert.runtimes import Runtime, facts, runtime_for


def gpu_hosts(spec):
    hosts = [h for h in spec.env.hosts_for("vllm") if h.gpus > 0]
    return hosts or spec.env.hosts_for("vllm")


def _off(spec) -> dict[str, object] | None:
    if spec.env.gpu_link.enabled:
        return None
    said = (f"GPU link is off for {spec.env.name} (environments/{spec.env.name}.toml: "
            "[gpu_link] enabled = false): nothing to do")
    return {h.name: said for h in gpu_hosts(spec)}


def run_hook(r: Runner, host, which: str, command: str, env: dict[str, str]) -> None:
    res = r.run(gpu.hook(command, env), check=False)
    if not res.ok:
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        raise AlbertError(
            f"host {host.name}: the {which} hook ({command!r}, gpu_link.{which}_hook) failed with "
            f"exit code {res.exit_code}: {' / '.join(tail) or '(no output)'}. Fix: make the hook "
            "work by hand on the host, then rerun the job (it is safe to rerun).")


def stop_vllm(r: Runner, rt: Runtime, env: str) -> list[str]:
    """Stop this env's vLLM servers on the host; their names."""
    names = [row["name"] for row in facts.units(r, rt, env) if row["service"] == "vllm"]
    for name in names:
        r.run(rt.stop(name))
    return names


def check_free_memory(r: Runner, host, deployment, base: str) -> str | None:
    """Refuse (and drop the lease) when the GPUs lack the memory this host's servers need."""
    smi = r.run(gpu.free_memory(), check=False)
    need: dict[int, float] = {}
    for inst in deployment.placement.vllm_on(host.name):
        for g in inst.gpu_ids:
            need[g] = need.get(g, 0.0) + inst.model.gpu_mem_use
    short = (gpu.shortfalls(gpu.parse_free_memory(smi.stdout), need) if smi.ok else
             [f"nvidia-smi failed (exit {smi.exit_code}): "
              f"{(smi.stderr or smi.stdout).strip()[-200:] or 'no output'}"])
    if short:
        r.run(gpu.remove(base), check=False)
        raise AlbertError(
            f"host {host.name}: not enough free GPU memory ({'; '.join(short)}). The "
            "lease was not kept. Fix: stop whatever uses the GPUs (`nvidia-smi` shows "
            "which process), or lower gpu_mem_use in the routing table, then rerun "
            "link-gpu.")
    return f"GPU memory checked on {len(need)} GPU(s)" if need else None


def _take(r: Runner, host, spec, ctx: RunContext, now: datetime):
    """Decide and write the lease; returns (decision, current lease, new lease)."""
    base, pipeline = spec.env.deploy.base_dir, ctx.lease_holder
    current = gpu.parse_lease(r.run(gpu.read(base)).stdout)
    decision = gpu.decide(current, pipeline, now)
    if decision == "refuse":
        assert current is not None
        raise AlbertError(
            f"host {host.name}: the GPUs are leased to {current.describe()}; this is pipeline "
            f"{pipeline}. Nothing was changed. Fix: wait for that pipeline to end (its "
            "unlink-gpu job frees them) or for the lease to expire, then retry this job.")
    lease = gpu.new_lease(spec.env.name, ctx.who, pipeline, spec.env.gpu_link.lease_minutes, now)
    expected = current.pipeline if current else None
    if not r.run(gpu.write(base, lease, expected), check=False).ok:
        raise AlbertError(f"host {host.name}: another pipeline changed the GPU lease at the "
                          "same moment. Fix: retry the job.")
    return decision, current, lease


def lease_metric(r: Runner, spec, lease: gpu.Lease | None) -> str | None:
    """Write (``lease``) or remove (None) the lease's node-exporter textfile, where a node exporter
    runs (``metrics.node_exporter_port``): the data of the "GPU lease held past its time" alert.
    A note when it could not be written (the lease itself stands)."""
    metrics = spec.env.metrics
    if not (metrics.enabled and metrics.node_exporter_port):
        return None
    cmd = (oc.write_lease_textfile(metrics.textfile_dir, lease) if lease is not None
           else oc.remove_lease_textfile(metrics.textfile_dir))
    res = r.run(cmd, check=False)
    if res.ok:
        return None
    said = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
    return (f"the lease metric was not {'written to' if lease else 'removed from'} "
            f"{metrics.textfile_dir} ({said[0]}): let the deploy user write there "
            "(metrics.textfile_dir)")


def link_gpu_env(spec, runners: RunnerFactory | None = None, now: datetime | None = None,
                 ctx: RunContext | None = None) -> dict[str, object]:
    """Take (or renew) this pipeline's lease; refuse while another live pipeline holds it.

    The free-memory check (when ``nvidia-smi`` exists) runs on take and takeover, not on renew
    (our own servers may already use the memory).
    """
    off = _off(spec)
    if off:
        return off
    deployment, ctx = resolved(spec), ctx or RunContext.from_environ()
    link, pipeline, rt = spec.env.gpu_link, ctx.lease_holder, runtime_for(spec.env)

    def one(r, host):
        decision, current, lease = _take(r, host, spec, ctx, now or datetime.now(timezone.utc))
        notes = []
        left = stop_vllm(r, rt, spec.env.name) if decision == "takeover" else []
        if left:
            notes.append(f"stopped {len(left)} vLLM server(s) it left")
        if decision != "renew" and r.run(gpu.has_nvidia_smi(), check=False).ok:
            checked = check_free_memory(r, host, deployment, spec.env.deploy.base_dir)
            notes += [checked] if checked else []
        if link.attach_hook:
            run_hook(r, host, "attach", link.attach_hook, _hook_env(spec, host, pipeline))
            notes.append("attach hook run")
        metric = lease_metric(r, spec, lease)
        notes += [metric] if metric else []
        said = {"take": f"lease taken for pipeline {pipeline}",
                "renew": f"already linked: lease of pipeline {pipeline} renewed",
                "takeover": f"expired lease of {current.describe() if current else '?'} taken over "
                            f"for pipeline {pipeline}"}[decision]
        return f"{said} until {lease.expires}" + "".join(f"; {n}" for n in notes)

    results = on_hosts(spec, one, runners, hosts=gpu_hosts(spec))
    raise_errors(results, "link-gpu")
    return results


def _hook_env(spec, host, pipeline: str) -> dict[str, str]:
    return {"ALBERT_ENV": spec.env.name, "ALBERT_HOST": host.name, "ALBERT_PIPELINE": pipeline}


def unlink_gpu_env(spec, runners: RunnerFactory | None = None, now: datetime | None = None,
                   ctx: RunContext | None = None) -> dict[str, object]:
    """Stop this env's vLLM servers, release the lease if ours, run the detach hook.

    While another live pipeline holds the lease nothing is touched (its servers and its GPU stay).
    With no lease (a pipeline that failed before or during link-gpu) it still stops what is left
    and runs the detach hook, so rerunning it is always safe.
    """
    off = _off(spec)
    if off:
        return off
    ctx = ctx or RunContext.from_environ()
    link, base, pipeline = spec.env.gpu_link, spec.env.deploy.base_dir, ctx.lease_holder
    rt = runtime_for(spec.env)

    def one(r, host):
        current = gpu.parse_lease(r.run(gpu.read(base)).stdout)
        if current is not None and gpu.decide(current, pipeline, now or datetime.now(timezone.utc)) == "refuse":
            return (f"left alone: the GPUs are leased to {current.describe()} (not pipeline "
                    f"{pipeline}); its vLLM servers keep running and no detach hook was run")
        stopped = stop_vllm(r, rt, spec.env.name)
        if current is None:
            lease = "no lease held"
        else:
            r.run(gpu.remove(base))
            lease = ("lease released" if current.pipeline == pipeline
                     else f"expired lease of pipeline {current.pipeline} removed")
        if link.detach_hook:
            run_hook(r, host, "detach", link.detach_hook, _hook_env(spec, host, pipeline))
        hook = "; detach hook run" if link.detach_hook else ""
        metric = lease_metric(r, spec, None)
        hook += f"; {metric}" if metric else ""
        if not stopped and current is None:
            return f"already unlinked: no vLLM server running, {lease}{hook}"
        return f"stopped {len(stopped)} vLLM server(s); {lease}{hook}"

    results = on_hosts(spec, one, runners, hosts=gpu_hosts(spec))
    raise_errors(results, "unlink-gpu")
    return results
