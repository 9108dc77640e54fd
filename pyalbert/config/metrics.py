"""``[metrics]`` of an environment: where Prometheus runs, how often it scrapes, what alerts.

Plain pydantic like the rest of :mod:`pyalbert.config` (``extra="forbid"``, frozen), the
``metrics`` key of :class:`~pyalbert.config.environment.EnvironmentSpec`. Nothing here touches a
host: the renderers in :mod:`pyalbert.observability.render` read it.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

DURATION_RE = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: str) -> str:
    if not DURATION_RE.match(value):
        raise ValueError(f"{value!r} is not a Prometheus duration: use e.g. '30s', '5m', '15d'")
    return value


class AlertsSpec(_Spec):
    """Thresholds and ``for:`` windows of the alert rules."""

    #: no replica of a model answers /metrics (or the gateway ejected them all) for this long
    model_down_for: str = "2m"
    #: share of the gateway's answers per model that are 5xx
    error_ratio: float = Field(0.05, gt=0, lt=1)
    error_ratio_for: str = "5m"
    #: time to first token, 95th percentile per model (seconds)
    ttft_p95_s: float = Field(5.0, gt=0)
    ttft_for: str = "5m"
    #: vLLM's KV-cache usage of one replica (0-1)
    kv_cache_usage: float = Field(0.9, gt=0, lt=1)
    kv_cache_for: str = "5m"
    #: waiting requests of a model: above this many and growing (over rate_window) for waiting_for
    waiting_requests: int = Field(5, ge=0)
    waiting_for: str = "10m"
    #: a GPU lease still held this long after its expiry
    gpu_lease_grace: str = "10m"
    #: 429 rejections per second for one API key
    rejections_per_s: float = Field(0.5, gt=0)
    rejections_for: str = "5m"
    #: window of rate() and deriv() in the rules (at least 4 scrape intervals)
    rate_window: str = "5m"

    @field_validator("model_down_for", "error_ratio_for", "ttft_for", "kv_cache_for",
                     "waiting_for", "gpu_lease_grace", "rejections_for", "rate_window")
    @classmethod
    def _durations(cls, value: str) -> str:
        return _duration(value)


class AlertmanagerSpec(_Spec):
    """Where Prometheus sends alerts, and the webhook Alertmanager calls."""

    #: host:port of the Alertmanager Prometheus talks to
    address: str = "127.0.0.1:9093"
    #: e.g. a chat webhook; None: Alertmanager keeps alerts to itself (its web UI)
    webhook_url: str | None = None

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class MetricsSpec(_Spec):
    """``[metrics]`` of ``config/environments/<env>.toml``."""

    enabled: bool = False
    #: host (a name of ``hosts``) that runs Prometheus; None: the first host running the api
    host: str | None = None
    port: int = Field(9090, ge=1024, le=65535)
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    #: ``--storage.tsdb.retention.time``
    retention: str = "15d"
    #: ``--storage.tsdb.retention.size`` (e.g. "20GB"); None: no size limit
    retention_size: str | None = None
    #: file on the Prometheus host holding the gateway's scrape key (``api.metrics_auth``);
    #: None: the gateway's /metrics is scraped without a key
    scrape_key_file: str | None = None
    #: a node exporter on every host (its textfile collector carries the GPU lease metric)
    node_exporter_port: int | None = Field(None, ge=1, le=65535)
    #: the node exporter's textfile folder on the GPU hosts (Debian's package reads this one):
    #: ``link-gpu`` writes the lease there, ``unlink-gpu`` removes it (the deploy user writes it)
    textfile_dir: str = "/var/lib/prometheus/node-exporter"
    alerts: AlertsSpec = AlertsSpec()
    alertmanager: AlertmanagerSpec | None = None

    @field_validator("scrape_interval", "evaluation_interval", "retention")
    @classmethod
    def _durations(cls, value: str) -> str:
        return _duration(value)

    @field_validator("retention_size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[0-9]+(B|KB|MB|GB|TB|PB|EB)$", value):
            raise ValueError(f"{value!r} is not a size: use e.g. '512MB', '20GB'")
        return value
