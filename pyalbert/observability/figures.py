"""Headline figures per model, from Prometheus or straight from the servers' /metrics.

Both paths end in the same :class:`ModelFigures` rows. Fetching is separate from computing:
:func:`from_scrapes` and :func:`from_query_results` are pure and tested on real output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from pyalbert.errors import AlbertError
from pyalbert.observability import exposition as ex
from pyalbert.observability import promql as q
from pyalbert.observability.render import Target


@dataclass
class ModelFigures:
    model: str
    replicas: int = 0
    replicas_up: int = 0
    ttft_p50: float = math.nan  # seconds
    ttft_p95: float = math.nan
    prompt_tps: float = math.nan  # tokens/s into the model
    generation_tps: float = math.nan  # tokens/s out
    running: float = math.nan
    waiting: float = math.nan
    kv_cache: float = math.nan  # 0-1, the fullest replica


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer of one server (``samples`` None: it did not answer)."""

    at: float
    samples: tuple[ex.Sample, ...] | None
    error: str = ""


@dataclass
class _Acc:
    ttft: dict[float, float] = field(default_factory=dict)
    prompt: float = 0.0
    generation: float = 0.0
    rate_seconds: float = 0.0  # the shortest span of the replicas' counter deltas (0: none)
    running: float = 0.0
    waiting: float = 0.0
    kv: float = math.nan
    seen: bool = False


def _delta(now: float | None, before: float | None) -> float | None:
    if now is None:
        return None
    if before is None or now < before:  # first look, or the server restarted: since its start
        return None
    return now - before


def from_scrapes(targets: Sequence[Target], now: Mapping[str, Scrape],
                 before: Mapping[str, Scrape] | None = None) -> list[ModelFigures]:
    """Figures per model from the servers' own /metrics (keyed by ``Target.unit``).

    With an earlier scrape per server (``before``), latencies and tokens/s cover the time
    between the two; without, latencies cover the server's life and tokens/s is unknown.
    """
    before = before or {}
    rows: dict[str, ModelFigures] = {}
    acc: dict[str, _Acc] = {}
    replicas: dict[str, set] = {}  # model -> its (host, replica); a replica's slots count once
    up: dict[str, set] = {}
    for t in targets:
        row = rows.setdefault(t.model, ModelFigures(t.model))
        a = acc.setdefault(t.model, _Acc())
        replicas.setdefault(t.model, set()).add((t.host, t.replica))
        row.replicas = len(replicas[t.model])
        cur = now.get(t.unit)
        if cur is None or cur.samples is None:
            continue
        up.setdefault(t.model, set()).add((t.host, t.replica))
        row.replicas_up = len(up[t.model])
        samples = cur.samples
        prev = before.get(t.unit)
        prev_samples = prev.samples if prev is not None and prev.samples is not None else None
        buckets = ex.buckets_of(samples, q.VLLM_TTFT)
        if prev_samples is not None:
            old = ex.buckets_of(prev_samples, q.VLLM_TTFT)
            if all(buckets.get(le, 0.0) >= c for le, c in old.items()):
                buckets = {le: c - old.get(le, 0.0) for le, c in buckets.items()}
        for le, c in buckets.items():
            a.ttft[le] = a.ttft.get(le, 0.0) + c
        if prev_samples is not None:
            span = cur.at - prev.at
            dp = _delta(ex.total(samples, q.VLLM_PROMPT_TOKENS), ex.total(prev_samples, q.VLLM_PROMPT_TOKENS))
            dg = _delta(ex.total(samples, q.VLLM_GENERATION_TOKENS),
                        ex.total(prev_samples, q.VLLM_GENERATION_TOKENS))
            if span > 0 and dp is not None and dg is not None:
                a.prompt += dp / span
                a.generation += dg / span
                a.rate_seconds = span
        a.running += ex.total(samples, q.VLLM_RUNNING) or 0.0
        a.waiting += ex.total(samples, q.VLLM_WAITING) or 0.0
        kv = [s.value for s in samples if s.name == q.VLLM_KV_CACHE]
        if kv:
            a.kv = max(kv) if math.isnan(a.kv) else max(a.kv, *kv)
        a.seen = True
    for model, row in rows.items():
        a = acc[model]
        if not a.seen:
            continue
        row.ttft_p50 = ex.histogram_quantile(0.5, a.ttft)
        row.ttft_p95 = ex.histogram_quantile(0.95, a.ttft)
        if a.rate_seconds:
            row.prompt_tps, row.generation_tps = a.prompt, a.generation
        row.running, row.waiting, row.kv_cache = a.running, a.waiting, a.kv
    return list(rows.values())


#: the instant queries ``albert top`` asks Prometheus, by figure
def top_queries(window: str = "1m") -> dict[str, str]:
    f = q.figures(window)
    return {name: f[name] for name in (q.TTFT_P50, q.TTFT_P95, q.PROMPT_TPS, q.GENERATION_TPS,
                                       q.RUNNING, q.WAITING, q.KV_CACHE, q.REPLICAS_UP, q.REPLICAS)}


_FIELDS = {q.TTFT_P50: "ttft_p50", q.TTFT_P95: "ttft_p95", q.PROMPT_TPS: "prompt_tps",
           q.GENERATION_TPS: "generation_tps", q.RUNNING: "running", q.WAITING: "waiting",
           q.KV_CACHE: "kv_cache", q.REPLICAS_UP: "replicas_up", q.REPLICAS: "replicas"}


def from_query_results(results: Mapping[str, Sequence[Mapping]],
                       models: Sequence[str] = ()) -> list[ModelFigures]:
    """Figures per model from Prometheus' instant-query vectors (``data.result`` of each query
    of :func:`top_queries`); ``models`` (the plan's) are listed even without any series."""
    rows = {m: ModelFigures(m) for m in models}
    for name, vector in results.items():
        attr = _FIELDS[name]
        for item in vector:
            model = item["metric"].get("model", "")
            row = rows.setdefault(model, ModelFigures(model))
            value = float(item["value"][1])
            setattr(row, attr, int(value) if attr in ("replicas", "replicas_up") else value)
    return sorted(rows.values(), key=lambda r: r.model)


# -- fetching ---------------------------------------------------------------------------------------
def scrape(client: httpx.Client, targets: Sequence[Target]) -> dict[str, Scrape]:
    out = {}
    for t in targets:
        at = time.time()
        try:
            resp = client.get(f"http://{t.address}/metrics")
            resp.raise_for_status()
            out[t.unit] = Scrape(at, tuple(ex.parse(resp.text)))
        except (httpx.HTTPError, ex.ParseError) as exc:
            out[t.unit] = Scrape(at, None, f"{exc.__class__.__name__}: {exc}")
    return out


def query_prometheus(client: httpx.Client, base_url: str, queries: Mapping[str, str]) -> dict[str, list]:
    out = {}
    for name, expr in queries.items():
        try:
            resp = client.get(f"{base_url.rstrip('/')}/api/v1/query", params={"query": expr})
        except httpx.HTTPError as exc:
            raise AlbertError(f"Prometheus at {base_url} does not answer ({exc.__class__.__name__}: "
                              f"{exc}). Fix: check --prometheus, or leave it out to read the "
                              "servers' /metrics directly.") from None
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        if resp.status_code != 200 or body.get("status") != "success":
            raise AlbertError(f"Prometheus at {base_url} refused the query {expr!r}: HTTP "
                              f"{resp.status_code} {body.get('error', resp.text[:200])}")
        out[name] = body["data"]["result"]
    return out
