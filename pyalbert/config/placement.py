"""The placement: which model replica runs on which host, port and GPUs.

Pure: a :class:`DeploymentSpec` in, a :class:`Placement` out, or a :class:`ConfigError` naming every
clash (ports on one host, GPU over-subscription, tensor parallelism wider than a host).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from functools import cached_property

from pyalbert.commands import api as api_cmd
from pyalbert.config.environment import HostSpec
from pyalbert.config.groups import (
    RayGroup,
    group_problems,
    port_problems,
    ray_group,
    split_problems,
)
from pyalbert.config.routing import ModelSpec
from pyalbert.config.spec import DeploymentSpec, display_path
from pyalbert.errors import ConfigError, Problem


def slug(model_id: str) -> str:
    """A model id as a container/unit name fragment: ``org/Name-7B`` -> ``org--name-7b``."""
    return model_id.replace("/", "--").replace("_", "-").replace(".", "-").lower()


@dataclass(frozen=True)
class VllmInstance:
    """One vLLM OpenAI server: one replica of one model on one host."""

    env: str
    model_id: str
    model: ModelSpec
    host: HostSpec
    replica: int
    gpu_ids: tuple[int, ...]
    #: where the server listens: 127.0.0.1 when every gateway runs on its host, else the host's
    #: private address (set by :func:`resolve_placement`; empty: the host's address)
    listen: str = ""
    #: a model split over a host group (issue 17): this server runs on the group's head
    group: RayGroup | None = None

    #: the spare slot: the same server on ``model.replace_port`` (a replace without downtime)
    spare: bool = False

    @property
    def port(self) -> int:
        return self.model.replace_port if self.spare else self.model.port

    @property
    def address(self) -> str:
        return self.listen or self.host.internal_address

    @property
    def name(self) -> str:
        suffix = f"-{self.replica}" if self.replica else ""
        return f"albert-{self.env}-vllm-{slug(self.model_id)}{suffix}{'-spare' if self.spare else ''}"

    @property
    def url(self) -> str:
        """What the gateways call (loopback or the private address, never a public one)."""
        return f"http://{self.address}:{self.port}"

    @property
    def base_url(self) -> str:
        """The primary slot's URL: the gateway's backends.json names a replica by it."""
        return f"http://{self.address}:{self.model.port}"

    def spare_slot(self) -> VllmInstance:
        return replace(self, spare=True)


@dataclass(frozen=True)
class ApiInstance:
    env: str
    host: HostSpec
    port: int

    @property
    def name(self) -> str:
        return f"albert-{self.env}-api"

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{self.port}"


@dataclass(frozen=True)
class Placement:
    spec: DeploymentSpec
    vllm: tuple[VllmInstance, ...]
    api: tuple[ApiInstance, ...]

    @property
    def hosts(self) -> tuple[HostSpec, ...]:
        return self.spec.env.hosts

    def vllm_on(self, host: str) -> list[VllmInstance]:
        return [i for i in self.vllm if i.host.name == host]

    def api_on(self, host: str) -> list[ApiInstance]:
        return [i for i in self.api if i.host.name == host]

    @property
    def groups(self) -> tuple[RayGroup, ...]:
        """The Ray clusters of the split models."""
        return tuple(i.group for i in self.vllm if i.group is not None)

    def groups_on(self, host: str) -> list[RayGroup]:
        return [g for g in self.groups if any(h.name == host for h in g.hosts)]

    @cached_property
    def backends(self) -> dict[str, list[str]]:
        """model id -> base URLs of its replicas (what the gateway routes to)."""
        out: dict[str, list[str]] = defaultdict(list)
        for inst in self.vllm:
            out[inst.model_id].append(inst.url)
        return dict(out)


def _place(spec: DeploymentSpec) -> tuple[list[VllmInstance], list[Problem]]:
    env, problems = spec.env, []
    env_file, routing_file = display_path(spec.env_file), display_path(spec.routing_file)
    vllm_hosts = env.hosts_for("vllm")
    usage: dict[str, list[float]] = {h.name: [0.0] * h.gpus for h in vllm_hosts}
    owners: dict[tuple[str, int], list[str]] = defaultdict(list)
    load: dict[str, int] = defaultdict(int)
    instances: list[VllmInstance] = []

    for model_id in env.placement:
        if model_id not in spec.models.root:
            problems.append(
                Problem(env_file, f"placement.{model_id}", "model is not in the routing table",
                        f"remove it or add it to {routing_file}")
            )
    if not vllm_hosts:
        problems.append(Problem(env_file, "hosts", "no host runs the 'vllm' service",
                                "add 'vllm' to the services of a host"))
        return instances, problems

    for model_id, model in spec.models:
        if env.group_of(model_id) is not None or model.pipeline_parallel_size > 1:
            inst, why = _place_group(spec, model_id, model, usage)
            instances += [inst] if inst else []
            problems += why
            continue
        names = env.placement.get(model_id)
        allowed = vllm_hosts
        if names:
            unknown = [n for n in names if n not in usage]
            if unknown:
                problems.append(Problem(env_file, f"placement.{model_id}",
                                        f"host(s) {', '.join(unknown)} do not run the 'vllm' service",
                                        "name hosts of 'hosts' whose services include 'vllm'"))
                continue
            allowed = [env.host(n) for n in names]
        if model.replicas > len(allowed):
            problems.append(Problem(routing_file, f"{model_id}.replicas",
                                    f"{model.replicas} replicas but only {len(allowed)} host(s) may run it",
                                    "lower replicas or add hosts (one replica per host)"))
            continue
        candidates = sorted(allowed, key=lambda h: (load[h.name], vllm_hosts.index(h)))
        placed = 0
        reasons = []
        for host in candidates:
            if placed == model.replicas:
                break
            gpu_ids, why = _fit(host, model, usage[host.name])
            if why:
                reasons.append(why)
                continue
            for g in gpu_ids:
                usage[host.name][g] += model.gpu_mem_use
                owners[(host.name, g)].append(model_id)
            load[host.name] += 1
            instances.append(VllmInstance(env.name, model_id, model, host, placed, gpu_ids))
            placed += 1
        if placed < model.replicas:
            problems.append(Problem(routing_file, model_id,
                                    "cannot be placed: " + "; ".join(reasons),
                                    "lower gpu_mem_use or tensor_parallel_size, add GPUs, "
                                    "or place the model on another host"))
    return instances, problems


def _place_group(spec: DeploymentSpec, model_id: str, model: ModelSpec,
                 usage: dict[str, list[float]]) -> tuple[VllmInstance | None, list[Problem]]:
    """A split model: every GPU of every host of its group, the server on the head."""
    problems = split_problems(spec, model_id, model)
    name = spec.env.group_of(model_id)
    if (problems or name not in spec.env.groups
            or not all(h in usage for h in spec.env.groups[name].hosts)):
        return None, problems  # a host of the group unknown or without vllm: group_problems
    group = ray_group(spec, model_id)
    assert group is not None
    for host in group.hosts:
        used = usage[host.name]
        full = [g for g in range(host.gpus) if used[g] + model.gpu_mem_use > 1.0 + 1e-9]
        if full:
            return None, [Problem(display_path(spec.routing_file), f"{model_id}.gpu_mem_use",
                                  f"GPU over-subscription on host {host.name} of group {name}: "
                                  f"GPU(s) {', '.join(map(str, full))} have "
                                  f"{1 - max(used[g] for g in full):.2f} free, the split model "
                                  f"takes {model.gpu_mem_use} of every GPU of the group",
                                  "lower gpu_mem_use or move the other models off the group")]
    for host in group.hosts:
        for g in range(host.gpus):
            usage[host.name][g] += model.gpu_mem_use
    return VllmInstance(spec.env.name, model_id, model, group.head, 0,
                        tuple(range(group.head.gpus)), group=group), []


def _fit(host: HostSpec, model: ModelSpec, used: list[float]) -> tuple[tuple[int, ...], str]:
    """GPUs for one replica on ``host``, or why it does not fit."""
    tp = model.tensor_parallel_size
    if host.gpus == 0:
        if tp > 1:
            return (), f"host {host.name} has no GPU (CPU serving) but tensor_parallel_size is {tp}"
        return (), ""
    if tp > host.gpus:
        return (), f"tensor_parallel_size {tp} > {host.gpus} GPU(s) on host {host.name}"
    free = sorted(range(host.gpus), key=lambda g: (used[g], g))[:tp]
    if any(used[g] + model.gpu_mem_use > 1.0 + 1e-9 for g in free):
        detail = ", ".join(f"GPU {g}: {1 - used[g]:.2f}" for g in range(host.gpus))
        return (), (f"GPU over-subscription on host {host.name}: needs gpu_mem_use "
                    f"{model.gpu_mem_use} on {tp} GPU(s), free is {detail} "
                    "(the sum of gpu_mem_use per GPU must be <= 1)")
    return tuple(sorted(free)), ""


def _port_clashes(spec: DeploymentSpec, vllm: list[VllmInstance]) -> list[Problem]:
    env, problems = spec.env, []
    routing_file = display_path(spec.routing_file)
    for host in env.hosts:
        taken: dict[int, str] = {}
        if "api" in host.services:
            taken[env.api.port] = "the api service (api.port)"
            for colour in api_cmd.COLOURS:
                taken[api_cmd.spare_port(env.api.port, colour)] = f"the api's {colour} colour"
        for inst in vllm:
            if inst.host.name != host.name:
                continue
            for key, port, what in (("port", inst.port, f"model '{inst.model_id}'"),
                                    ("spare_port", inst.model.replace_port,
                                     f"model '{inst.model_id}' (its spare port)")):
                if port in taken:
                    problems.append(Problem(routing_file, f"{inst.model_id}.{key}",
                                            f"port {port} on host {host.name} is already used by "
                                            f"{taken[port]}",
                                            "give each model on a host its own port and spare_port"))
                else:
                    taken[port] = what
    return problems


def _metrics_problems(spec: DeploymentSpec, vllm: list[VllmInstance]) -> list[Problem]:
    """``[metrics]``: its host is one of ``hosts``; its port is free there (api, models)."""
    env, metrics, env_file = spec.env, spec.env.metrics, display_path(spec.env_file)
    if not metrics.enabled:
        return []
    names = [h.name for h in env.hosts]
    if metrics.host is not None and metrics.host not in names:
        return [Problem(env_file, "metrics.host", f"host {metrics.host!r} is not in 'hosts'",
                        "name one of " + ", ".join(names))]
    api_hosts = env.hosts_for("api")
    host = metrics.host or (api_hosts[0].name if api_hosts else names[0])
    taken = {i.port: f"model '{i.model_id}'" for i in vllm if i.host.name == host}
    if any(h.name == host for h in api_hosts):
        taken[env.api.port] = "the api service (api.port)"
    problems = _unscrapable(spec, vllm, host)
    if metrics.port in taken:
        problems.append(Problem(env_file, "metrics.port",
                                f"port {metrics.port} on host {host} (Prometheus) is already used by "
                                f"{taken[metrics.port]}", "give Prometheus another port (e.g. 9090)"))
    return problems


def _unscrapable(spec: DeploymentSpec, vllm: list[VllmInstance], host: str) -> list[Problem]:
    """vLLM servers bound to loopback (:func:`_listen`) on another host than Prometheus's."""
    far = sorted({i.host.name for i in _listen(vllm, spec.env.hosts_for("api"))
                  if i.listen == "127.0.0.1" and i.host.name != host})
    return [Problem(display_path(spec.env_file), "metrics.host",
                    f"Prometheus on host {host} cannot scrape the vLLM servers of host {name}: they "
                    f"listen on 127.0.0.1 only (every gateway runs on {name})",
                    f"set metrics.host = '{name}' (or remove the key: Prometheus then runs on the "
                    "gateway's host)") for name in far]


def resolve_placement(spec: DeploymentSpec) -> Placement:
    problems = group_problems(spec)
    vllm, more = _place(spec)
    problems += more + _port_clashes(spec, vllm)
    problems += port_problems(spec, {h.name: {f"port of model '{i.model_id}'": i.port
                                              for i in vllm if i.host.name == h.name}
                                     for h in spec.env.hosts})
    problems += _metrics_problems(spec, vllm)
    api_hosts = spec.env.hosts_for("api")
    if not api_hosts:
        problems.append(Problem(display_path(spec.env_file), "hosts",
                                "no host runs the 'api' service", "add 'api' to a host's services"))
    if problems:
        raise ConfigError(problems)
    api = tuple(ApiInstance(spec.env.name, h, spec.env.api.port) for h in api_hosts)
    return Placement(spec=spec, vllm=tuple(_listen(vllm, api_hosts)), api=api)


def _listen(vllm: list[VllmInstance], api_hosts) -> list[VllmInstance]:
    """Loopback when every gateway of the environment runs on the server's host, else the
    host's private address: a model server is never reachable where no gateway needs it."""
    gateways = {h.name for h in api_hosts}
    return [replace(i, listen="127.0.0.1" if gateways == {i.host.name} else i.host.internal_address)
            for i in vllm]
