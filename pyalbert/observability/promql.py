"""Metric names and the PromQL of every figure: one source for the rules, the dashboard and top.

vLLM names are those vllm 0.32 exposes (``tests/fixtures/vllm/metrics-0.32-*.txt`` is a real
scrape). The gateway's are :mod:`pyalbert.api.metrics`; the GPU lease's is a node-exporter
textfile, see :data:`PENDING`.
"""

from __future__ import annotations

# -- vLLM (per server; Prometheus adds model, host, replica from the plan) --------------------
VLLM_TTFT = "vllm:time_to_first_token_seconds"  # histogram
VLLM_ITL = "vllm:inter_token_latency_seconds"  # histogram
VLLM_E2E = "vllm:e2e_request_latency_seconds"  # histogram
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens_total"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_CACHE = "vllm:kv_cache_usage_perc"  # 0-1, despite the name
VLLM_SUCCESS = "vllm:request_success_total"  # by finished_reason

# -- the gateway ---------------------------------------------------------------------------------
API_REQUESTS = "albert_requests_total"  # route, model, status
API_UPSTREAM_ERRORS = "albert_upstream_errors_total"  # model, kind
API_TOKENS = "albert_tokens_total"  # key, model
API_REPLICA_HEALTHY = "albert_replica_healthy"  # model, replica (upstream URL)
API_IN_FLIGHT = "albert_in_flight"

#: requests the gateway refused itself, per key name: ``albert_rejections_total{key, status,
#: reason}`` (:meth:`pyalbert.api.metrics.Metrics.reject`; status "429" for rate limits)
API_REJECTIONS = "albert_rejections_total"
#: a held GPU lease (``pyalbert.commands.gpu``): a node-exporter textfile written at ``link-gpu``
#: and removed at ``unlink-gpu`` (:func:`pyalbert.observability.commands.write_lease_textfile`);
#: scraped only where a node exporter runs (``metrics.node_exporter_port``)
GPU_LEASE_EXPIRY = "albert_gpu_lease_expiry_timestamp_seconds"

#: names the rules and the dashboard use that the local stack does not expose (no node exporter)
PENDING = (GPU_LEASE_EXPIRY,)

PROXIED_ROUTES = 'route=~"chat|completions|embeddings"'

#: recording rule names (the dashboard and the alerts read these)
TTFT_P50 = "albert:vllm_ttft_seconds:p50"
TTFT_P95 = "albert:vllm_ttft_seconds:p95"
ITL_P50 = "albert:vllm_itl_seconds:p50"
ITL_P95 = "albert:vllm_itl_seconds:p95"
PROMPT_TPS = "albert:vllm_prompt_tokens:rate"
GENERATION_TPS = "albert:vllm_generation_tokens:rate"
RUNNING = "albert:vllm_requests_running:sum"
WAITING = "albert:vllm_requests_waiting:sum"
KV_CACHE = "albert:vllm_kv_cache_usage:max"
REPLICAS_UP = "albert:vllm_replicas_up:sum"
REPLICAS = "albert:vllm_replicas:count"
API_RPS = "albert:api_requests:rate"
API_5XX_RATIO = "albert:api_5xx:ratio"
API_REJECTIONS_RATE = "albert:api_rejections:rate"


def _sel(*matchers: str) -> str:
    kept = [m for m in matchers if m]
    return "{" + ",".join(kept) + "}" if kept else ""


def quantile(q: float, histogram: str, window: str, match: str = "") -> str:
    return (f"histogram_quantile({q:g}, sum by (model, le) "
            f"(rate({histogram}_bucket{_sel(match)}[{window}])))")


def figures(window: str = "5m", match: str = "") -> dict[str, str]:
    """Recording rule name -> PromQL, per model; ``match`` narrows (``model=~"$model"``)."""
    vllm = _sel('job="vllm"', match)
    api = _sel(PROXIED_ROUTES, match)
    api_5xx = _sel(PROXIED_ROUTES, 'status=~"5.."', match)
    total = f"sum by (model) (rate({API_REQUESTS}{api}[{window}]))"
    return {
        TTFT_P50: quantile(0.5, VLLM_TTFT, window, match),
        TTFT_P95: quantile(0.95, VLLM_TTFT, window, match),
        ITL_P50: quantile(0.5, VLLM_ITL, window, match),
        ITL_P95: quantile(0.95, VLLM_ITL, window, match),
        PROMPT_TPS: f"sum by (model) (rate({VLLM_PROMPT_TOKENS}{_sel(match)}[{window}]))",
        GENERATION_TPS: f"sum by (model) (rate({VLLM_GENERATION_TOKENS}{_sel(match)}[{window}]))",
        RUNNING: f"sum by (model) ({VLLM_RUNNING}{_sel(match)})",
        WAITING: f"sum by (model) ({VLLM_WAITING}{_sel(match)})",
        KV_CACHE: f"max by (model) ({VLLM_KV_CACHE}{_sel(match)})",
        # a replica is up when either of its slots (primary or spare port) answers
        REPLICAS_UP: f"sum by (model) (max by (model, host, replica) (up{vllm}))",
        REPLICAS: f"count by (model) (max by (model, host, replica) (up{vllm}))",
        API_RPS: f"sum by (model, status) (rate({API_REQUESTS}{api}[{window}]))",
        # 0 (not "no data") while there is traffic and no 5xx
        API_5XX_RATIO: (f"(sum by (model) (rate({API_REQUESTS}{api_5xx}[{window}])) or {total} * 0)"
                        f" / {total}"),
        API_REJECTIONS_RATE: f"sum by (key, status) (rate({API_REJECTIONS}[{window}]))",
    }
