"""Runtimes: how units run on a host (containers, or supervised processes from a venv).

``base`` holds the data (units, files, inputs), the :class:`Runtime` seam and the unit material
both runtimes share; ``checks`` the typed preflight checks; ``facts`` what the engine asks a host
(a command plus its parser).
"""

from __future__ import annotations

from pyalbert.config.environment import EnvironmentSpec
from pyalbert.runtimes.base import Runtime
from pyalbert.runtimes.docker import DockerRuntime
from pyalbert.runtimes.venv import VenvRuntime


def runtime_for(env: EnvironmentSpec) -> Runtime:
    """The environment's runtime: containers, or supervised processes from a venv."""
    if env.runtime == "venv":
        return VenvRuntime(env)
    return DockerRuntime()


__all__ = ["DockerRuntime", "Runtime", "VenvRuntime", "runtime_for"]
