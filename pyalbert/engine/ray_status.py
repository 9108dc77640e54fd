"""What ``fab status`` says of a host group's Ray cluster (issue 17): asked on the head.

The node units' rows get a health (every node of the group listed, or how many), and the head's
host lists the cluster's nodes with their resources (``ray status -v``, parsed by
:func:`pyalbert.commands.ray.parse_status`).
"""

from __future__ import annotations

from pyalbert.commands import ray
from pyalbert.config.groups import RayGroup
from pyalbert.config.placement import Placement
from pyalbert.remote import Runner
from pyalbert.runtimes.base import DeployInputs, Runtime

GiB = 2**30


def node_line(group: RayGroup, node: ray.RayNode) -> str:
    """``ray gpu-ab node 3d0eeae442fc active: CPU 0/1, GPU 0/8, memory 0.0/15.7 GiB``."""
    parts = []
    for name in ("CPU", "GPU", "memory"):
        use = node.resources.get(name)
        if use is None:
            continue
        if name == "memory":
            parts.append(f"memory {use.used / GiB:.1f}/{use.total / GiB:.1f} GiB")
        else:
            parts.append(f"{name} {use.used:g}/{use.total:g}")
    return f"ray {group.name} node {node.node_id[:12]} {node.state}: {', '.join(parts) or '-'}"


def judge(group: RayGroup, stdout: str) -> tuple[str, list[str]]:
    """(health of the group's node units, a line per node) from ``ray status -v`` output."""
    try:
        found = ray.parse_status(stdout)
    except ray.RayStatusError:
        return "no ray status", []
    if found is None:
        return "starting", []
    count, want = len(found.nodes), len(group.hosts)
    health = "ok" if count >= want else f"{count} of {want} nodes"
    return health, [node_line(group, n) for n in found.nodes]


def group_status(r: Runner, rt: Runtime, placement: Placement, host: str
                 ) -> dict[str, tuple[str, list[str]]]:
    """Unit name -> (health, node lines: on the group's head only) for the groups of ``host``."""
    out = {}
    for group in placement.groups_on(host):
        node = next(h for h in group.hosts if h.name == host)
        unit = rt.ray_unit(group, placement, node, DeployInputs(release_id="status"))
        assert isinstance(unit.ready, ray.ClusterReady)
        health, lines = judge(group, r.run(unit.ready.cmd(), check=False).stdout)
        out[unit.name] = (health, lines if group.is_head(node) else [])
    return out
