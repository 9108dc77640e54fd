"""Configuration: one validated model for everything the tools read.

``load_spec`` returns one :class:`Deployment`: the validated spec and its placement (which model
replica runs on which host, port and GPUs), resolved once.
"""

from pyalbert.config.deployment import Deployment, resolved
from pyalbert.config.environment import EnvironmentSpec, HostSpec, SecretRef
from pyalbert.config.loader import find_config_dir, load_routing_table, load_spec
from pyalbert.config.placement import ApiInstance, Placement, VllmInstance, resolve_placement, slug
from pyalbert.config.routing import ModelSpec, RoutingTable
from pyalbert.config.spec import DeploymentSpec

__all__ = [
    "ApiInstance",
    "Deployment",
    "DeploymentSpec",
    "EnvironmentSpec",
    "HostSpec",
    "ModelSpec",
    "Placement",
    "RoutingTable",
    "SecretRef",
    "VllmInstance",
    "find_config_dir",
    "load_routing_table",
    "load_spec",
    "resolve_placement",
    "resolved",
    "slug",
]
