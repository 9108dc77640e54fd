"""What both runtimes build the same way for a model split over a host group (issue 17).

A group becomes units: a Ray node on every host of the group (the head on the first, bound to
the host's private address, ``ray start --block`` so the runtime restarts a node that dies), then
the vLLM server on the head with ``--distributed-executor-backend ray`` and the Ray environment.
A node unit is ready when ``ray status`` at the head lists every node of the group; the vLLM unit
comes after the head's node unit on the head, so it starts on a whole cluster.

Docker: the nodes run the vLLM image, whose Ray needs its client extra (``grpcio``: vLLM's own
packages bring it): the head pins ``--ray-client-server-port`` and a Ray without it refuses to
start (``ValueError: Ray Client requires pip package `ray[client]```, in the node's log).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyalbert.commands import ray
from pyalbert.commands.base import Cmd
from pyalbert.config.environment import HostSpec
from pyalbert.config.groups import RayGroup
from pyalbert.config.placement import VllmInstance
from pyalbert.runtimes.checks import Check, PortFree


def node_cmd(group: RayGroup, host: HostSpec, ray_bin: str) -> Cmd:
    """``env VLLM_HOST_IP=... ray start (--head | --address HEAD) --block ...`` for ``host``
    (the head's behind :func:`ray.forgetting_last_cluster`)."""
    common = {"ray": ray_bin, "num_cpus": group.num_cpus, "num_gpus": host.gpus or None,
              "temp_dir": group.temp_dir(host), "block": True, "interface": group.interface}
    if group.is_head(host):  # a restart must not trip on the last start's address file
        return ray.forgetting_last_cluster(
            ray.start_head(host.internal_address, group.ports, **common), group.temp_dir(host))
    return ray.start_worker(group.address, host.internal_address, group.ports, **common)


def cluster_ready(group: RayGroup, ray_prefix: Sequence[str]) -> ray.ClusterReady:
    return ray.ClusterReady(group.address, len(group.hosts), tuple(ray_prefix))


def vllm_args(inst: VllmInstance) -> list[str]:
    """More server arguments for a split model (none for a model on one host)."""
    if inst.group is None:
        return []
    return ray.vllm_multinode_args(inst.model.pipeline_parallel_size)


def vllm_env(inst: VllmInstance) -> dict[str, str]:
    """The server's Ray environment on the head: join the group's cluster, never start one."""
    group = inst.group
    if group is None:
        return {}
    env = ray.vllm_env(group.head.internal_address, group.ports)
    if group.interface:
        env |= {"GLOO_SOCKET_IFNAME": group.interface, "NCCL_SOCKET_IFNAME": group.interface}
    return env


def node_checks(group: RayGroup, host: HostSpec) -> list[Check]:
    """The node's ports are free (or its own unit's, on a re-run)."""
    ports = [group.ports.gcs] if group.is_head(host) else []
    ports += sorted(group.ports.node_ports().values())
    return [PortFree(p, group.unit_name()) for p in ports]
