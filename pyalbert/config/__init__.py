"""Configuration: one validated model for everything the tools read."""

from pyalbert.config.environment import EnvironmentSpec, HostSpec, SecretRef
from pyalbert.config.loader import DeploymentSpec, find_config_dir, load_routing_table, load_spec
from pyalbert.config.plan import ApiInstance, Plan, VllmInstance, resolve_plan, slug
from pyalbert.config.routing import ModelSpec, RoutingTable

__all__ = [
    "ApiInstance",
    "DeploymentSpec",
    "EnvironmentSpec",
    "HostSpec",
    "ModelSpec",
    "Plan",
    "RoutingTable",
    "SecretRef",
    "VllmInstance",
    "find_config_dir",
    "load_routing_table",
    "load_spec",
    "resolve_plan",
    "slug",
]
