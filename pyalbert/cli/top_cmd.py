"""``albert top --env ENV``: a live table per model: TTFT, tokens/s, queue, KV cache, replicas.

From Prometheus when there is one (``--prometheus URL``, or the environment's ``[metrics]``),
else straight from every vLLM server's /metrics of the plan.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

from rich.table import Table

from pyalbert.ui import console


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    top = sub.add_parser("top", help="live figures per model (TTFT, tokens/s, queue, KV cache)")
    common_env(top)
    top.add_argument("--prometheus", metavar="URL", default=None,
                     help="read from this Prometheus (default: the environment's, if it has one; "
                          "else the servers' /metrics)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--window", default="1m", help="rate/percentile window in Prometheus (default 1m)")
    top.add_argument("--once", action="store_true", help="print one table and exit (scripts, CI logs)")
    top.set_defaults(func=top_command)


def _num(value: float, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value * scale)


def table(rows: Sequence, source: str, title: str = "albert top") -> Table:
    t = Table(title=f"{title}: {source}", title_justify="left")
    for col, justify in (("model", "left"), ("replicas up", "right"), ("TTFT p50", "right"),
                         ("TTFT p95", "right"), ("tok/s in", "right"), ("tok/s out", "right"),
                         ("running", "right"), ("waiting", "right"), ("KV cache", "right")):
        t.add_column(col, justify=justify)
    for r in rows:
        up = f"{r.replicas_up}/{r.replicas}"
        t.add_row(r.model, f"[red]{up}[/]" if r.replicas_up < r.replicas or not r.replicas else up,
                  _num(r.ttft_p50, "{:.0f} ms", 1000), _num(r.ttft_p95, "{:.0f} ms", 1000),
                  _num(r.prompt_tps, "{:.1f}"), _num(r.generation_tps, "{:.1f}"),
                  _num(r.running, "{:.0f}"), _num(r.waiting, "{:.0f}"),
                  _num(r.kv_cache, "{:.0f} %", 100))
    return t


def _prometheus_url(args: argparse.Namespace, plan) -> str | None:
    if args.prometheus:
        return args.prometheus
    metrics = getattr(plan.spec.env, "metrics", None)  # [metrics], once the environment has it
    if metrics is not None and getattr(metrics, "enabled", False):
        from pyalbert.observability.render import hostport, prometheus_host

        return f"http://{hostport(prometheus_host(plan, metrics).address, metrics.port)}"
    return None


class Source:
    """One refresh -> rows; keeps the previous scrape for rates when reading servers directly."""

    def __init__(self, plan, prometheus: str | None, window: str):
        import httpx

        from pyalbert.observability.render import targets

        self.client = httpx.Client(timeout=5.0)
        self.prometheus = prometheus
        self.window = window
        self.vllm, _ = targets(plan)
        self.models = list(dict.fromkeys(t.model for t in self.vllm))
        self.before: dict = {}
        self.name = (f"Prometheus {prometheus} (window {window})" if prometheus
                     else f"{sum(not t.slot for t in self.vllm)} vLLM server(s), /metrics")

    def rows(self) -> list:
        from pyalbert.observability import figures as f

        if self.prometheus:
            results = f.query_prometheus(self.client, self.prometheus, f.top_queries(self.window))
            return f.from_query_results(results, self.models)
        now = f.scrape(self.client, self.vllm)
        rows = f.from_scrapes(self.vllm, now, self.before)
        self.before = now
        return rows

    def close(self) -> None:
        self.client.close()


def top_command(args: argparse.Namespace) -> int:
    from pyalbert.config import load_spec

    plan = load_spec(args.env, args.config_dir).placement
    source = Source(plan, _prometheus_url(args, plan), args.window)
    try:
        if args.once:
            rows = source.rows()
            if not source.prometheus:  # a second look: rates need two scrapes
                time.sleep(args.interval)
                rows = source.rows()
            console.print(table(rows, source.name))
            return 0
        from rich.live import Live

        with Live(table(source.rows(), source.name), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(table(source.rows(), source.name), refresh=True)
    finally:
        source.close()
