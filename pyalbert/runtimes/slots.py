"""Two slots per vLLM replica: the server on its port, and the same server on its spare port.

A replace without downtime starts the new server in the slot that is idle, beside the one that
serves (:mod:`pyalbert.engine.vllm_replace`). :class:`VllmSlots` is what that needs, built with
the unit (pure): the other slot's unit, how the gateway names the replica (its base URL and
route file) and whether the host has room for two servers (on GPUs the ``gpu_mem_use`` budget,
known from the placement; on CPU a probe of the free RAM against an estimate, at deploy time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyalbert.commands import routes
from pyalbert.commands.base import Cmd
from pyalbert.config.placement import Placement, VllmInstance

if TYPE_CHECKING:
    from pyalbert.runtimes.base import Unit


@dataclass(frozen=True)
class VllmSlots:
    #: the same server in the other slot (its own name, port, env file)
    other: Unit
    model: str
    #: the replica as the gateway's backends.json names it (the primary slot's URL)
    base_url: str
    #: the route file's name in the gateways' routes folders (the primary slot's unit name)
    route: str
    #: GPU hosts: None when a second server fits the GPUs' gpu_mem_use budget, else why not
    gpu_no_room: str | None = None
    #: CPU hosts: prints the free RAM and the weights' size (:func:`routes.memory`)
    memory_probe: Cmd | None = None
    #: CPU hosts: the KV cache a server allocates (GiB)
    kv_gib: float = routes.CPU_KV_DEFAULT_GIB


def url_of(unit: Unit) -> str:
    """Where a vLLM unit serves (its readiness check's address)."""
    host = unit.ready.host if unit.ready else "127.0.0.1"
    return f"http://{host}:{unit.port}"


def gpu_no_room(placement: Placement, inst: VllmInstance) -> str | None:
    """Pure: None when a second server of ``inst`` fits its GPUs beside everything placed there."""
    over = []
    for gpu in inst.gpu_ids:
        used = sum(i.model.gpu_mem_use for i in placement.vllm_on(inst.host.name) if gpu in i.gpu_ids)
        if used + inst.model.gpu_mem_use > 1.0 + 1e-9:
            over.append(f"GPU {gpu}: {used:.2f} used + {inst.model.gpu_mem_use:.2f}")
    if not over:
        return None
    return ("a second server would exceed the GPUs' memory budget (" + ", ".join(over)
            + " > 1.00 of gpu_mem_use)")


def kv_gib(environ: dict[str, str]) -> float:
    try:
        return float(environ.get("VLLM_CPU_KVCACHE_SPACE", routes.CPU_KV_DEFAULT_GIB))
    except ValueError:
        return routes.CPU_KV_DEFAULT_GIB


def cpu_no_room(stdout: str, kv: float) -> str | None:
    """Pure: the memory probe's verdict; None when a second CPU server fits the free RAM."""
    parsed = routes.parse_memory(stdout)
    if parsed is None:
        return "the free memory could not be read"
    avail, weights = parsed
    need = routes.cpu_estimate(weights, kv)
    if avail >= need:
        return None
    return (f"a second server needs about {need / routes.GIB:.1f} GiB (weights "
            f"{weights / routes.GIB:.1f} + KV cache {kv:g} + 1 GiB) and {avail / routes.GIB:.1f} GiB "
            "of RAM is free")


def slots_for(placement: Placement, inst: VllmInstance, other: Unit,
              environ: dict[str, str]) -> VllmSlots:
    env = placement.spec.env
    cpu = inst.host.gpus == 0
    return VllmSlots(
        other=other, model=inst.model_id, base_url=inst.base_url,
        route=inst.spare_slot().name.removesuffix("-spare") if inst.spare else inst.name,
        gpu_no_room=None if cpu else gpu_no_room(placement, inst),
        memory_probe=routes.memory(f"{env.storage_dir}/{inst.model_id}") if cpu else None,
        kv_gib=kv_gib(environ))


@dataclass(frozen=True)
class ReplaceSettings:
    """What a host's replace needs beyond its units: where the gateways are and the limits."""

    #: the hosts running a gateway (each has the routes folder)
    gateways: tuple
    routes_dir: str
    max_unavailable: int = 1
    drain_timeout_s: float = 120.0


def replace_settings(placement: Placement) -> ReplaceSettings:
    env = placement.spec.env
    return ReplaceSettings(tuple(a.host for a in placement.api),
                           routes.routes_dir(env.deploy.base_dir, env.name),
                           env.deploy.max_unavailable, env.deploy.drain_timeout_s)
