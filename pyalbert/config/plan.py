"""Old names of the placement, for code written against them: ``Plan`` is
:class:`~pyalbert.config.placement.Placement`, ``resolve_plan`` is
:func:`~pyalbert.config.placement.resolve_placement`. New code uses the placement's names ("plan"
now only names a host's deploy plan, :mod:`pyalbert.engine.host_plans`)."""

from pyalbert.config.placement import ApiInstance, VllmInstance, slug
from pyalbert.config.placement import Placement as Plan
from pyalbert.config.placement import resolve_placement as resolve_plan

__all__ = ["ApiInstance", "Plan", "VllmInstance", "resolve_plan", "slug"]
