"""One environment, validated and placed: what ``load_spec`` returns and every operation takes.

A :class:`Deployment` is a :class:`~pyalbert.config.spec.DeploymentSpec` (so everything that reads
the spec reads it unchanged) plus its :class:`~pyalbert.config.placement.Placement`, resolved once
when the config is loaded, never again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyalbert.config.placement import Placement, resolve_placement
from pyalbert.config.spec import DeploymentSpec


@dataclass(frozen=True, kw_only=True)
class Deployment(DeploymentSpec):
    placement: Placement

    @classmethod
    def of(cls, spec: DeploymentSpec, placement: Placement) -> Deployment:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(DeploymentSpec)}
        return cls(**fields, placement=placement)


def resolved(spec: DeploymentSpec) -> Deployment:
    """``spec`` with its placement: as loaded (resolved once), or resolved now for a bare spec."""
    if isinstance(spec, Deployment):
        return spec
    return Deployment.of(spec, resolve_placement(spec))
