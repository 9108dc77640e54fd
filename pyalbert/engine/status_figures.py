"""Headline figures per model for ``fab status``: TTFT, tokens/s, queue, KV cache, replicas up.

Asked on the hosts over SSH (the machine running ``fab`` may not reach them): the environment's
Prometheus answers the same instant queries as ``albert top`` when ``[metrics]`` is enabled, else
each vLLM server's own ``/metrics`` is read once on its host (latencies since the server started,
no rates). Both end in :class:`~pyalbert.observability.figures.ModelFigures` rows.
"""

from __future__ import annotations

import json

from pyalbert.engine.fanout import RunnerFactory
from pyalbert.engine.operations import on_hosts
from pyalbert.errors import AlbertError
from pyalbert.observability import commands as oc
from pyalbert.observability import exposition as ex
from pyalbert.observability import figures as f
from pyalbert.observability.render import prometheus_host, targets

#: the rate and percentile window of the figures asked of Prometheus
WINDOW = "5m"


def status_figures(spec, runners: RunnerFactory | None = None) -> tuple[str, list[f.ModelFigures]]:
    """(where the figures come from, one row per model of the plan)."""
    plan, metrics = spec.placement, spec.env.metrics
    vllm, _ = targets(plan)
    models = list(dict.fromkeys(t.model for t in vllm))
    if metrics.enabled:
        host = prometheus_host(plan, metrics)
        base = f"http://127.0.0.1:{metrics.port}"

        def ask(r, h) -> dict[str, list]:
            out = {}
            for name, expr in f.top_queries(WINDOW).items():
                res = r.run(oc.query(base, expr), check=False)
                try:
                    out[name] = json.loads(res.stdout)["data"]["result"] if res.ok else None
                except (ValueError, KeyError, TypeError):
                    out[name] = None
                if out[name] is None:
                    raise AlbertError(f"the Prometheus of host {h.name} (port {metrics.port}) did not "
                                      f"answer {expr!r}: {(res.stderr or res.stdout).strip()[-200:]}")
            return out

        results = on_hosts(spec, ask, runners, hosts=[host])[host.name]
        if isinstance(results, AlbertError):
            raise results
        return (f"Prometheus on {host.name} (window {WINDOW})",
                f.from_query_results(results, models))

    def read(r, h) -> dict[str, f.Scrape]:
        out = {}
        for t in (t for t in vllm if t.host == h.name):
            res = r.run(oc.scrape(t.address), check=False)
            try:
                samples = tuple(ex.parse(res.stdout)) if res.ok else None
            except ex.ParseError:
                samples = None
            out[t.unit] = f.Scrape(0.0, samples)
        return out

    hosts = [h for h in spec.env.hosts if any(t.host == h.name for t in vllm)]
    now: dict[str, f.Scrape] = {}
    for value in on_hosts(spec, read, runners, hosts=hosts).values():
        if isinstance(value, dict):  # an unreachable host: its servers count as down
            now.update(value)
    return f"{sum(not t.slot for t in vllm)} vLLM server(s), /metrics read once (no rates)", f.from_scrapes(vllm, now)
