"""What a deploy does on each host, as data: a pure function of the placement and inputs.

``deploy_plans(placement, inputs)`` returns one :class:`HostPlan` per host: the preflight checks,
the files of the new release, and the units (:mod:`pyalbert.runtimes.base`) in start order. The
engine (:mod:`pyalbert.engine.host`) runs them; a manifest records a release for ``rollback``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pyalbert.commands import api as api_cmd
from pyalbert.commands import health, release
from pyalbert.commands.base import Cmd, Raw
from pyalbert.commands.ray import ClusterReady
from pyalbert.config.environment import HostSpec
from pyalbert.config.placement import Placement
from pyalbert.errors import AlbertError
from pyalbert.observability import prometheus_host
from pyalbert.runtimes import DockerRuntime, Runtime, ray_units, runtime_for
from pyalbert.runtimes.base import ApiSwap, DeployInputs, FileSpec, Reload, Unit, config_hash
from pyalbert.runtimes.checks import Check, DiskFree, ModelPresent, PortFree
from pyalbert.runtimes.gpu_fit import GpuMemoryFit
from pyalbert.runtimes.model_args import ModelArgsFit
from pyalbert.runtimes.prometheus import prometheus_unit
from pyalbert.runtimes.slots import ReplaceSettings, VllmSlots, replace_settings, slots_for

#: free space a host needs under base_dir and the docker data root (MiB), unless told otherwise
MIN_FREE_MIB = 1024


@dataclass(frozen=True)
class HostPlan:
    host: HostSpec
    env: str
    base_dir: str
    release_id: str
    checks: tuple[Check, ...]
    files: tuple[FileSpec, ...]
    units: tuple[Unit | ApiSwap, ...]
    ready_timeout_s: float
    keep_releases: int
    runtime: Runtime
    #: remove units of this env that the plan does not name (only for a full deploy)
    remove_orphans: bool = True
    #: gateways and limits of a replace without downtime (None: stop then start)
    replace: ReplaceSettings | None = None

    @property
    def release_dir(self) -> str:
        return release.release_dir(self.base_dir, self.release_id)

    def names(self) -> set[str]:
        out: set[str] = set()
        for u in self.units:
            if isinstance(u, ApiSwap):
                out |= {u.edge.name, *(c.name for c in u.colours.values())}
            else:
                out.add(u.name)
                if u.slots is not None:
                    out.add(u.slots.other.name)
        return out


def deploy_plans(placement: Placement, inputs: DeployInputs, runtime: Runtime | None = None,
                 *, min_free_mib: int = MIN_FREE_MIB) -> list[HostPlan]:
    """One :class:`HostPlan` per host that has something to run (vLLM first, then the api)."""
    _refuse_bad_inputs(placement, inputs)
    env = placement.spec.env
    runtime = runtime or runtime_for(env)
    rel_dir = release.release_dir(env.deploy.base_dir, inputs.release_id)
    out = []
    for host in env.hosts:
        units: list[Unit | ApiSwap] = []
        files: list[FileSpec] = []
        checks: list[Check] = [*runtime.checks(), DiskFree(env.deploy.base_dir, min_free_mib)]
        if inputs.service in ("vllm", "all"):
            for group in placement.groups_on(host.name):  # Ray nodes first: vLLM joins them
                if inputs.model and group.model_id != inputs.model:
                    continue
                units += runtime.group_units(group, placement, host, inputs)
                checks += ray_units.node_checks(group, host)
            for inst in placement.vllm_on(host.name):
                if inputs.model and inst.model_id != inputs.model:
                    continue
                unit, unit_files = runtime.vllm_unit(inst, placement, inputs, rel_dir)
                if inst.group is None:  # a split model (Ray) restarts in place
                    unit, spare_files = _with_slots(unit, inst, placement, runtime, inputs, rel_dir)
                    unit_files = [*unit_files, *spare_files]
                units.append(unit)
                files += unit_files
                checks += [ModelPresent(inst.model_id, f"{env.storage_dir}/{inst.model_id}"),
                           _model_args_fit(inst.model_id, inst.model, f"{env.storage_dir}/{inst.model_id}",
                                           env.vllm.extra_args),
                           PortFree(inst.port, inst.name)]
                if inst.gpu_ids and inst.group is None:
                    checks.append(_gpu_memory_fit(inst, unit, f"{env.storage_dir}/{inst.model_id}",
                                                  env.vllm.extra_args))
        if inputs.service in ("api", "all") and not inputs.model and placement.api_on(host.name):
            swap, api_files = runtime.api_swap(placement, host, inputs, rel_dir)
            units.append(swap)
            files += api_files
            checks += [*swap.checks, PortFree(env.api.port, swap.edge.name),
                       *([PortFree(env.edge.redirect_port, swap.edge.name)] if env.edge.redirect_port else [])]
        if (env.metrics.enabled and inputs.service == "all" and not inputs.model
                and prometheus_host(placement, env.metrics).name == host.name):
            unit, unit_files, unit_checks = prometheus_unit(placement, runtime, inputs.release_id, rel_dir)
            units.append(unit)
            files += unit_files
            checks += [*unit_checks, PortFree(env.metrics.port, unit.name)]
        if units:
            out.append(HostPlan(
                host=host, env=env.name, base_dir=env.deploy.base_dir,
                release_id=inputs.release_id, checks=tuple(checks), files=tuple(files),
                units=tuple(units), ready_timeout_s=env.deploy.ready_timeout_s,
                keep_releases=env.deploy.keep_releases, runtime=runtime,
                remove_orphans=inputs.service == "all" and not inputs.model,
                replace=replace_settings(placement)))
    return out


def _with_slots(unit: Unit, inst, placement: Placement, runtime: Runtime, inputs: DeployInputs,
                rel_dir: str) -> tuple[Unit, list[FileSpec]]:
    """The unit with its spare slot (the same server on the spare port) and that slot's files."""
    spare, files = runtime.vllm_unit(inst.spare_slot(), placement, inputs, rel_dir)
    environ = {**placement.spec.env.vllm.env, **inst.model.env}
    return replace(unit, slots=slots_for(placement, inst, spare, environ)), files


def _gpu_memory_fit(inst, unit: Unit, model_dir: str, env_extra: tuple[str, ...]) -> GpuMemoryFit:
    """The GPUs' free memory (nvidia-smi) and the will-it-fit estimate, refused before a stop."""
    slots = unit.slots
    return GpuMemoryFit(inst.model_id, (unit.name, *((slots.other.name,) if slots else ())), model_dir,
                        inst.gpu_ids, inst.model.gpu_mem_use, inst.model.max_model_len,
                        inst.model.quantization, (*env_extra, *inst.model.extra_args),
                        beside=slots is not None and slots.gpu_no_room is None)


def _refuse_bad_inputs(placement: Placement, inputs: DeployInputs) -> None:
    spec, env = placement.spec, placement.spec.env
    if inputs.model and inputs.model not in spec.models.root:
        raise AlbertError(f"--model {inputs.model!r} is not in the routing table "
                          f"({spec.routing_file.name}). Fix: use one of {', '.join(spec.models.ids())}.")
    if (inputs.service in ("api", "all") and not inputs.model and "api_keys" not in inputs.secrets
            and env.tier in ("production", "staging")):
        ref = env.secrets["api_keys"]
        raise AlbertError(
            f"the {env.tier} api needs its keys file and ${ref.env} is not set. Fix: set the CI/CD "
            f"variable {ref.env} (type File) to a keys file (hashed keys: `albert api hash-key`); "
            "only development and testing environments may run the api without keys."
        )


def manifest(hp: HostPlan, started: Mapping[str, str], *, who: str, when: str,
             previous: str | None, serving: Mapping[str, Unit] | None = None) -> dict:
    """The release manifest: enough to restart every unit of this release (``rollback``).

    ``started`` maps a unit name to the release whose files it uses (this one when it was
    started now, an older one when it was unchanged).
    """
    units = []
    for planned in hp.units:
        u = (serving or {}).get(planned.name, planned) if isinstance(planned, Unit) else planned
        if isinstance(u, ApiSwap):
            units.append({"name": u.edge.name, "service": "edge", "config_hash": u.edge.config_hash,
                          "start": u.edge.start.render(), "port": u.edge.port,
                          **_recorded_reload_of(u.edge),
                          "release": started.get(u.edge.name, hp.release_id)})
            colour_release = next((started[c.name] for c in u.colours.values() if c.name in started),
                                  hp.release_id)
            units.append({"name": f"albert-{hp.env}-api-*", "service": "api",
                          "config_hash": u.config_hash, "release": colour_release,
                          "upstream_file": u.upstream_file,
                          "colours": {k: {"name": c.name, "start": c.start.render(), "port": c.port}
                                      for k, c in u.colours.items()}})
        else:
            units.append({"name": u.name, "service": u.service, "model": u.model_id,
                          "config_hash": u.config_hash, "start": u.start.render(), "port": u.port,
                          "release": started.get(u.name, hp.release_id),
                          **({"warm_probe": u.warm_probe.render()} if u.warm_probe else {}),
                          **_recorded_reload_of(u),
                          **_recorded_ready(u),
                          **({"slots": _slots_record(u.slots)} if u.slots else {})})
    return {"format": 1, "release": hp.release_id, "env": hp.env, "host": hp.host.name,
            "created": when, "who": who, "previous": previous, "units": units}


def _recorded_reload_of(u: Unit) -> dict:
    if u.reload is None:
        return {}
    return {"reload": {"digest": u.reload.digest, "probe": u.reload.probe.render(),
                       "apply": u.reload.apply.render()}}


def _recorded_ready(u: Unit) -> dict:
    """How the unit's readiness is asked, for a rollback: where the server listens and its key's
    header file, or the Ray cluster a node waits for."""
    if isinstance(u.ready, ClusterReady):
        return {"ready_ray": {"address": u.ready.address, "nodes": u.ready.nodes,
                              "ray": list(u.ready.ray)}}
    if u.ready is None:  # ready once started (a group's PID-namespace holder)
        return {"ready": None}
    return {"ready_host": u.ready.host, "ready_header": u.ready.header_file,
            **({"ready_path": u.ready.path} if u.ready.path != "/health" else {})}


def units_from_manifest(data: Mapping, runtime: Runtime | None = None) -> list[Unit | ApiSwap]:
    """Pure: the units of a recorded release, with their recorded start commands (rollback)."""
    runtime = runtime or DockerRuntime()
    out: list[Unit | ApiSwap] = []
    edge: Unit | None = None
    for u in data.get("units", []):
        if u["service"] == "edge":
            edge = _recorded_unit(u, runtime, None)
            continue
        if u["service"] == "api":
            colours = {k: _recorded_unit({**c, "config_hash": u["config_hash"], "service": "api"},
                                         runtime, health.ReadyCheck(c["port"]))
                       for k, c in u["colours"].items()}
            assert edge is not None, "an api entry follows its edge"
            out.append(ApiSwap(edge=edge, colours=colours, upstream_file=u["upstream_file"],
                               read_upstream=api_cmd.read_upstream(u["upstream_file"])))
            continue
        if "ready" in u and u["ready"] is None:
            out.append(_recorded_unit(u, runtime, None))
            continue
        if "ready_ray" in u:
            ray = u["ready_ray"]
            ready = ClusterReady(ray["address"], ray["nodes"], tuple(ray["ray"]))
            out.append(_recorded_unit(u, runtime, ready))
            continue
        out.append(_recorded_unit(u, runtime, health.ReadyCheck(
            u["port"], u.get("model"), host=u.get("ready_host") or "127.0.0.1",
            header_file=u.get("ready_header"), path=u.get("ready_path", "/health"))))
    return out


def _slots_record(slots: VllmSlots) -> dict:
    o = slots.other
    return {"model": slots.model, "base_url": slots.base_url, "route": slots.route,
            "gpu_no_room": slots.gpu_no_room, "kv_gib": slots.kv_gib,
            "memory_probe": slots.memory_probe.render() if slots.memory_probe else None,
            "other": {"name": o.name, "config_hash": o.config_hash, "start": o.start.render(),
                      "port": o.port}}


def _recorded_slots(u: Mapping, runtime: Runtime, ready: health.ReadyCheck) -> VllmSlots | None:
    """A recorded server's other slot (a rollback replaces it without downtime too)."""
    s = u.get("slots")
    if not s:
        return None
    other = _recorded_unit({**s["other"], "service": "vllm", "model": u.get("model")}, runtime,
                           dataclasses.replace(ready, port=s["other"]["port"]))
    return VllmSlots(other=other, model=s["model"], base_url=s["base_url"], route=s["route"],
                     gpu_no_room=s.get("gpu_no_room"), kv_gib=s.get("kv_gib", 4),
                     memory_probe=Cmd((Raw(s["memory_probe"]),)) if s.get("memory_probe") else None)


def _recorded_unit(u: Mapping, runtime: Runtime,
                   ready: health.ReadyCheck | ClusterReady | None) -> Unit:
    slots = _recorded_slots(u, runtime, ready) if isinstance(ready, health.ReadyCheck) else None
    return Unit(slots=slots, name=u["name"], service=u["service"], config_hash=u["config_hash"],
                start=Cmd((Raw(u["start"]),)), stop=runtime.stop(u["name"]),
                probe=runtime.probe(u["name"]), logs=runtime.logs(u["name"], 40),
                ready=ready, model_id=u.get("model"), port=u.get("port"),
                warm_probe=Cmd((Raw(u["warm_probe"]),)) if u.get("warm_probe") else None,
                reload=_recorded_reload(u.get("reload")))


def _recorded_reload(r: Mapping | None) -> Reload | None:
    return Reload(r["digest"], Cmd((Raw(r["probe"]),)), Cmd((Raw(r["apply"]),))) if r else None


def orphans(running: Sequence[Mapping[str, str]], hp: HostPlan) -> list[str]:
    """Pure: containers of this env on the host that the plan no longer names, a group's
    PID-namespace holder after the others (stopped first, it would kill what joined it)."""
    if not hp.remove_orphans:
        return []
    keep = hp.names()
    gone = [r for r in running if r["name"] not in keep]
    return [r["name"] for r in sorted(gone, key=lambda r: (r.get("service") == "ray-pid", r["name"]))]


def release_id(now_utc: str, plans_material: object) -> str:
    """``YYYYmmdd-HHMMSS-<hash6>`` from a UTC time ``YYYYmmddTHHMMSS`` and the config."""
    return f"{now_utc.replace('T', '-')}-{config_hash({'m': plans_material})[:6]}"


def _model_args_fit(model_id: str, model, model_dir: str, env_extra: tuple[str, ...]) -> ModelArgsFit:
    """The routing table's arguments against the weights' config.json (refused before a stop)."""
    return ModelArgsFit(model_id, model_dir, model.max_model_len, model.tensor_parallel_size,
                        model.quantization, tuple(sorted(model.env.items())),
                        (*env_extra, *model.extra_args), model.pipeline_parallel_size)
