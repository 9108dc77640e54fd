"""``[metrics]`` settings: they live in :mod:`pyalbert.config.metrics` (config is a lower layer);
re-exported here for the observability package."""

from pyalbert.config.metrics import DURATION_RE, AlertmanagerSpec, AlertsSpec, MetricsSpec

__all__ = ["DURATION_RE", "AlertmanagerSpec", "AlertsSpec", "MetricsSpec"]
