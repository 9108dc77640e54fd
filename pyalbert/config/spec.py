"""The validated configuration of one environment (no placement yet): what every step reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyalbert.config.environment import EnvironmentSpec
from pyalbert.config.routing import RoutingTable


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (for messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class DeploymentSpec:
    """A validated environment with its routing table: the input of every operation."""

    env: EnvironmentSpec
    models: RoutingTable
    config_dir: Path
    env_file: Path
    routing_file: Path
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.env.name
