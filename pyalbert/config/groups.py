"""Host groups: one model split over several hosts on a Ray cluster (issue 17), validated.

``[groups.gpu-ab] hosts = ["gpu-a", "gpu-b"]`` names the hosts, ``placement = { "llama-405b" = {
group = "gpu-ab" } }`` puts a model on them, ``[ray]`` pins the ports. Pure: a spec in, a
:class:`RayGroup` per split model out, or :class:`~pyalbert.errors.Problem` s naming the file, the
key and the fix, before any host is touched.

A group is runtime-neutral (host names, ports, the split): the runtimes render it as units (a Ray
head on the first host, workers on the others, vLLM on the head); another engine could render the
same group as a RayCluster resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pyalbert.commands import api as api_cmd
from pyalbert.commands.ray import head_address, parallel_problems
from pyalbert.config.environment import GroupPlacement, HostSpec
from pyalbert.config.ray_ports import RayPortsSpec
from pyalbert.config.routing import ModelSpec
from pyalbert.config.spec import DeploymentSpec, display_path
from pyalbert.errors import Problem


@dataclass(frozen=True)
class RayGroup:
    """The hosts that serve one model together, head first."""

    env: str
    name: str
    model_id: str
    hosts: tuple[HostSpec, ...]
    ports: RayPortsSpec
    interface: str | None = None
    num_cpus: int | None = None
    temp_dir_template: str = "/tmp/ray-{env}-{host}"

    @property
    def head(self) -> HostSpec:
        return self.hosts[0]

    @property
    def workers(self) -> tuple[HostSpec, ...]:
        return self.hosts[1:]

    @property
    def address(self) -> str:
        """The head's GCS on its private address: what workers, vLLM and ``ray status`` use."""
        return head_address(self.head.internal_address, self.ports)

    def is_head(self, host: HostSpec) -> bool:
        return host.name == self.head.name

    def unit_name(self) -> str:
        """The Ray node unit's name on each host of the group (one node per host)."""
        return f"albert-{self.env}-ray-{self.name}"

    def temp_dir(self, host: HostSpec) -> str:
        return self.temp_dir_template.format(env=self.env, host=host.name)


def devices(host: HostSpec) -> int:
    """What a host gives a split model: its GPUs, or one CPU worker on a host without GPU."""
    return host.gpus or 1


def group_problems(spec: DeploymentSpec) -> list[Problem]:
    """The groups themselves: known hosts running vllm, no host in two groups, one model each."""
    env, env_file = spec.env, display_path(spec.env_file)
    names = {h.name for h in env.hosts}
    vllm = {h.name for h in env.hosts_for("vllm")}
    out: list[Problem] = []
    owner: dict[str, str] = {}
    for group, gspec in env.groups.items():
        key = f"groups.{group}.hosts"
        missing = [h for h in gspec.hosts if h not in names]
        if missing:
            out.append(Problem(env_file, key, f"host(s) {', '.join(missing)} are not in 'hosts'",
                               "add them to 'hosts' or name hosts of 'hosts': "
                               + ", ".join(sorted(names))))
        idle = [h for h in gspec.hosts if h in names and h not in vllm]
        if idle:
            out.append(Problem(env_file, key, f"host(s) {', '.join(idle)} do not run the 'vllm' "
                               "service", "add 'vllm' to their services or leave them out"))
        for host in gspec.hosts:
            if host in owner:
                out.append(Problem(env_file, key, f"host {host} is already in group {owner[host]} "
                                   "(a host runs one Ray node)", "keep each host in one group"))
            owner.setdefault(host, group)
    users: dict[str, list[str]] = {}
    for model_id, where in env.placement.items():
        if isinstance(where, GroupPlacement):
            if where.group not in env.groups:
                known = ", ".join(sorted(env.groups)) or "none defined"
                out.append(Problem(env_file, f"placement.{model_id}.group",
                                   f"no group named {where.group!r} (groups: {known})",
                                   f"add [groups.{where.group}] hosts = [...] or name a group"))
            users.setdefault(where.group, []).append(model_id)
    for group, models in users.items():
        if len(models) > 1:
            out.append(Problem(env_file, f"groups.{group}",
                               f"models {', '.join(models)} are all placed on this group",
                               "one model per group: it takes every GPU of the group"))
    for problem in env.ray.ports.problems():
        out.append(Problem(env_file, "ray.ports", problem))
    return out


def split_problems(spec: DeploymentSpec, model_id: str, model: ModelSpec) -> list[Problem]:
    """One model's split: on a group, one replica, TP x PP = the group's GPUs, TP <= a host's."""
    env, routing_file = spec.env, display_path(spec.routing_file)
    group = env.group_of(model_id)
    if group is None:
        if model.pipeline_parallel_size > 1:
            return [Problem(routing_file, f"{model_id}.pipeline_parallel_size",
                            f"is {model.pipeline_parallel_size} but the model is not placed on a "
                            "host group", f"place it on one in {display_path(spec.env_file)} "
                            f'(placement = {{ "{model_id}" = {{ group = "NAME" }} }}) or set 1')]
        return []
    if group not in env.groups:
        return []  # group_problems names it
    out = []
    if model.replicas != 1:
        out.append(Problem(routing_file, f"{model_id}.replicas",
                           f"is {model.replicas} but a model split over group {group} is one "
                           "replica", "set replicas = 1 (or remove it)"))
    hosts = [env.host(h) for h in env.groups[group].hosts if h in {x.name for x in env.hosts}]
    for text in parallel_problems(pipeline_parallel_size=model.pipeline_parallel_size,
                                  tensor_parallel_size=model.tensor_parallel_size,
                                  gpus_per_host=[devices(h) for h in hosts]):
        out.append(Problem(routing_file, f"{model_id}.pipeline_parallel_size",
                           f"group {group} ({', '.join(h.name for h in hosts)}): {text}"))
    return out


def port_problems(spec: DeploymentSpec, vllm_ports: Mapping[str, Mapping[str, int]]) -> list[Problem]:
    """Ray's ports against every other listener of a group's hosts: the model servers there
    (``vllm_ports``: host -> {what: port}), the api and its two colours, Prometheus."""
    env, env_file = spec.env, display_path(spec.env_file)
    ports = env.ray.ports
    in_groups = {h for g in env.groups.values() for h in g.hosts}
    out = []
    metrics_host = None
    if env.metrics.enabled:
        api_hosts = env.hosts_for("api")
        metrics_host = env.metrics.host or (api_hosts[0].name if api_hosts else env.hosts[0].name)
    for host in env.hosts:
        if host.name not in in_groups:
            continue
        others = dict(vllm_ports.get(host.name, {}))
        if "api" in host.services:
            others["api.port"] = env.api.port
            for colour in api_cmd.COLOURS:
                others[f"the api's {colour} colour (from api.port)"] = api_cmd.spare_port(
                    env.api.port, colour)
        if host.name == metrics_host:
            others["metrics.port"] = env.metrics.port
        for text in ports.clashes_with(others):
            out.append(Problem(env_file, "ray.ports", f"on host {host.name}: {text}"))
    return out


def ray_group(spec: DeploymentSpec, model_id: str) -> RayGroup | None:
    """The valid group a model is split over (call after the problems above are empty)."""
    env = spec.env
    name = env.group_of(model_id)
    if name is None:
        return None
    return RayGroup(env=env.name, name=name, model_id=model_id,
                    hosts=tuple(env.host(h) for h in env.groups[name].hosts),
                    ports=env.ray.ports, interface=env.ray.interface, num_cpus=env.ray.num_cpus,
                    temp_dir_template=env.ray.temp_dir)
