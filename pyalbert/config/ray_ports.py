"""``[ray.ports]``: every port a Ray node listens on (issue 17), and what the Ray builders
(:mod:`pyalbert.commands.ray`), the config checks and the firewall ask of them. The one source of
these ports and their defaults (Ray's own, but ``metrics_export``).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict


class RayPortsSpec(BaseModel):
    """Ports of a Ray node. ``gcs`` (``--port``) and ``client_server`` listen on the head only;
    ``dashboard`` only when the dashboard is on. Workers of a task listen on
    ``min_worker..max_worker``: one port per worker process, so the range bounds how many run at
    once on a node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gcs: int = 6379
    client_server: int = 10001
    dashboard: int = 8265
    object_manager: int = 8076
    node_manager: int = 8077
    runtime_env_agent: int = 8078
    dashboard_agent_grpc: int = 8079
    dashboard_agent_listen: int = 52365
    #: Ray's default is 8080, the api's default port: moved out of its way
    metrics_export: int = 8085
    min_worker: int = 10002
    max_worker: int = 10100

    def node_ports(self) -> dict[str, int]:
        """Single ports every node (head or worker) listens on, by their ``ray start`` flag."""
        return {
            "--object-manager-port": self.object_manager,
            "--node-manager-port": self.node_manager,
            "--runtime-env-agent-port": self.runtime_env_agent,
            "--dashboard-agent-grpc-port": self.dashboard_agent_grpc,
            "--dashboard-agent-listen-port": self.dashboard_agent_listen,
            "--metrics-export-port": self.metrics_export,
        }

    def between_nodes(self, *, head: bool) -> list[int | tuple[int, int]]:
        """What the firewall of one node opens to the other hosts of its group (ranges inclusive).

        The client server stays closed (vLLM is a driver on the head, not a remote client), and so
        does the dashboard (bound to the private address, reached through an SSH tunnel).
        """
        ports: list[int | tuple[int, int]] = [self.gcs] if head else []
        ports += sorted(self.node_ports().values())
        ports.append((self.min_worker, self.max_worker))
        return ports

    def problems(self) -> list[str]:
        """Mistakes in these ports, each naming the field and the fix (empty: fine)."""
        out: list[str] = []
        named = self.model_dump()
        for name, port in named.items():
            if not 1024 <= port <= 65535:
                out.append(f"ray port {name} = {port} is outside 1024-65535: pick an unprivileged port")
        if self.min_worker > self.max_worker:
            out.append(f"ray ports min_worker = {self.min_worker} > max_worker = {self.max_worker}: "
                       f"swap them")
        seen: dict[int, str] = {}
        for name, port in named.items():
            if name in ("min_worker", "max_worker"):
                continue
            if port in seen:
                out.append(f"ray ports {seen[port]} and {name} are both {port}: give each its own")
            seen.setdefault(port, name)
            if self.min_worker <= port <= self.max_worker:
                out.append(f"ray port {name} = {port} is inside the worker range "
                           f"{self.min_worker}-{self.max_worker}: move it out of the range")
        return out

    def clashes_with(self, other_ports: Mapping[str, int]) -> list[str]:
        """Other listeners of the same host (``{"vllm port of llama-405b": 8001}``) on a Ray port."""
        mine = {**{k.lstrip("-").removesuffix("-port"): v for k, v in self.node_ports().items()},
                "gcs": self.gcs, "client_server": self.client_server, "dashboard": self.dashboard}
        out = []
        for what, port in other_ports.items():
            hits = [name for name, p in mine.items() if p == port]
            if hits:
                out.append(f"{what} = {port} clashes with ray port {hits[0]}: change one of them")
            elif self.min_worker <= port <= self.max_worker:
                out.append(f"{what} = {port} is inside the ray worker range "
                           f"{self.min_worker}-{self.max_worker}: move it out of the range")
        return out
