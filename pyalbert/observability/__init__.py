"""Metrics of an environment: Prometheus config and rules rendered from the plan, the Grafana
dashboard as code, and the figures ``albert top`` shows.

- :class:`MetricsSpec`: the ``[metrics]`` settings (thresholds, retention, scrape interval,
  scrape key file, Alertmanager webhook).
- :func:`render_all` (plan, metrics) -> {file name: content}: ``prometheus.yml``, the rule file
  and its ``promtool test rules`` file, ``alertmanager.yml``.
- :mod:`~pyalbert.observability.commands`: ``Cmd`` builders: :func:`install` (staged, checked by
  promtool, then moved in place), ``serve``, ``reload_http``, ``reload_signal``, the GPU lease
  textfile.
- :mod:`~pyalbert.observability.dashboard`: ``docs/dashboard.json``.
"""

from pyalbert.observability.render import prometheus_config, prometheus_host, render_all, targets
from pyalbert.observability.spec import AlertmanagerSpec, AlertsSpec, MetricsSpec

__all__ = [
    "AlertmanagerSpec",
    "AlertsSpec",
    "MetricsSpec",
    "prometheus_config",
    "prometheus_host",
    "render_all",
    "targets",
]
