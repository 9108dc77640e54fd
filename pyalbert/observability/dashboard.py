"""The Grafana dashboard as code: plain dicts (Grafana's JSON model, schema 39), no library.

``python -m pyalbert.observability.dashboard > docs/dashboard.json`` writes it; a unit test fails
when the checked-in file is stale, and the live test runs every panel's query on a real
Prometheus. Queries come from :mod:`pyalbert.observability.promql`, like the rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pyalbert.observability import promql as q

UID = "albert-deploy"
MODEL = 'model=~"$model"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: str = "timeseries"
    width: int = 12


def panels() -> list[tuple[str, list[Panel]]]:
    """Rows of panels: (row title, panels)."""
    f = q.figures("$__rate_interval", MODEL)
    by_model = "{{model}}"
    return [
        ("Models", [
            Panel("Replicas up", "none", (
                Query(f'max by (model, host, replica) (up{{job="vllm",{MODEL}}})',
                      "{{model}} {{host}}/{{replica}}"),),
                "1 when the vLLM server answers /metrics, per replica", kind="state-timeline"),
            Panel("Gateway: replica health", "none", (
                Query(f"max by (model, replica) ({q.API_REPLICA_HEALTHY}{{{MODEL}}})",
                      "{{model}} {{replica}}"),),
                "1 while the gateway routes to the replica, 0 once ejected", kind="state-timeline"),
            Panel("Time to first token", "s", (
                Query(f[q.TTFT_P50], f"p50 {by_model}"),
                Query(f[q.TTFT_P95], f"p95 {by_model}"),
                Query(q.quantile(0.99, q.VLLM_TTFT, "$__rate_interval", MODEL), f"p99 {by_model}"),
            )),
            Panel("Inter-token latency", "s", (
                Query(f[q.ITL_P50], f"p50 {by_model}"),
                Query(f[q.ITL_P95], f"p95 {by_model}"),
                Query(q.quantile(0.99, q.VLLM_ITL, "$__rate_interval", MODEL), f"p99 {by_model}"),
            )),
            Panel("Tokens/s", "short", (
                Query(f[q.PROMPT_TPS], f"in (prompt) {by_model}"),
                Query(f[q.GENERATION_TPS], f"out (generated) {by_model}"),
            )),
            Panel("Requests running / waiting", "short", (
                Query(f[q.RUNNING], f"running {by_model}"),
                Query(f[q.WAITING], f"waiting {by_model}"),
            )),
            Panel("KV-cache use", "percentunit", (
                Query(f"max by (model, host, replica) ({q.VLLM_KV_CACHE}{{{MODEL}}})",
                      "{{model}} {{host}}/{{replica}}"),),
                "vLLM's KV-cache usage per replica (alert above the configured threshold)"),
            Panel("End-to-end request latency", "s", (
                Query(q.quantile(0.5, q.VLLM_E2E, "$__rate_interval", MODEL), f"p50 {by_model}"),
                Query(q.quantile(0.95, q.VLLM_E2E, "$__rate_interval", MODEL), f"p95 {by_model}"),
            )),
        ]),
        ("Gateway", [
            Panel("Requests/s by status", "reqps", (
                Query(f[q.API_RPS], "{{model}} {{status}}"),), width=8),
            Panel("5xx ratio", "percentunit", (
                Query(f[q.API_5XX_RATIO], by_model),), width=8),
            Panel("Errors by code", "reqps", (
                Query(f'sum by (model, status) (rate({q.API_REQUESTS}{{status!~"2..",{MODEL}}}'
                      '[$__rate_interval]))', "{{model}} {{status}}"),
                Query(f"sum by (model, kind) (rate({q.API_UPSTREAM_ERRORS}{{{MODEL}}}"
                      "[$__rate_interval]))", "upstream {{model}} {{kind}}"),
            ), width=8),
            Panel("Rejections by key and code", "reqps", (
                Query(q.figures("$__rate_interval")[q.API_REJECTIONS_RATE], "{{key}} {{status}}"),),
                "albert_rejections_total: per-key rejections (rate limits: 429)"),
            Panel("Tokens by key", "short", (
                Query(f"sum by (key) (rate({q.API_TOKENS}{{{MODEL}}}[$__rate_interval]))", "{{key}}"),),
                "tokens/s reported by the replicas, per API key"),
        ]),
    ]


def _panel(pid: int, p: Panel, x: int, y: int) -> dict:
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
             "legendFormat": t.legend, "range": True}
            for i, t in enumerate(p.queries)
        ],
    }


def build() -> dict:
    out, y, pid = [], 0, 1
    for row_title, row_panels in panels():
        out.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for p in row_panels:
            if x + p.width > 24:
                x, y = 0, y + 8
            out.append(_panel(pid, p, x, y))
            pid, x = pid + 1, x + p.width
        y += 8
    return {
        "uid": UID,
        "title": "Albert Deploy",
        "tags": ["albert", "vllm"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "model", "type": "query", "label": "model", "datasource": DATASOURCE,
             "query": {"query": 'label_values(up{job="vllm"}, model)', "refId": "models"},
             "definition": 'label_values(up{job="vllm"}, model)',
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": out,
        "annotations": {"list": []},
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    d = dashboard or build()
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", ())]


if __name__ == "__main__":
    print(render(), end="")
