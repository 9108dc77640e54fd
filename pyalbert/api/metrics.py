"""Prometheus text exposition of the gateway's counters (one gateway process).

Every label value is escaped (backslash, double quote, new line), and label sets stay bounded:
routes are the gateway's own names (a path it does not serve counts as ``other``), models are the
routing table's, keys the keys file's names. A raw request path as a label let a client inject
series (``GET /x%22%7D%201%0Aalbert_fake...``) and grow the exposition without end (issue 14).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import defaultdict

from pyalbert.api.routing import Router

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _label(value: object) -> str:
    """A label value as the text format wants it (escaped backslash, quote and new line)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.upstream_errors: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        #: (key name, status, reason) of requests the gateway refused itself
        self.rejections: dict[tuple[str, int, str], int] = defaultdict(int)
        self.retries = 0
        self.in_flight = 0
        self.reloads = 0
        self.reload_failures = 0
        self.duration: dict[str, list[float]] = {}

    def observe(self, route: str, model: str, status: int, seconds: float) -> None:
        self.requests[(route, model, status)] += 1
        hist = self.duration.get(route)
        if hist is None:
            hist = self.duration[route] = [0.0] * (len(BUCKETS) + 2)
        hist[bisect_left(BUCKETS, seconds)] += 1
        hist[-1] += seconds

    def reject(self, key: str, status: int, reason: str) -> None:
        """A request the gateway refused itself (a 4xx: key, rate limit, body, head, deadline...);
        ``key`` is the key's name ("" before authentication), ``reason`` our error code."""
        if 400 <= status < 500:
            self.rejections[(key, status, reason)] += 1

    def render(self, router: Router, whitelist_entries: int) -> bytes:
        lines = [
            "# HELP albert_requests_total Requests answered, by route, model and status.",
            "# TYPE albert_requests_total counter",
        ]
        for (route, model, status), n in sorted(self.requests.items()):
            lines.append(f'albert_requests_total{{route="{_label(route)}",model="{_label(model)}",'
                         f'status="{_label(status)}"}} {n}')
        lines += ["# HELP albert_request_duration_seconds Time to the end of the response.",
                  "# TYPE albert_request_duration_seconds histogram"]
        for raw_route, hist in sorted(self.duration.items()):
            route = _label(raw_route)
            total = 0
            for bound, count in zip(BUCKETS, hist, strict=False):
                total += int(count)
                lines.append(f'albert_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {total}')
            total += int(hist[len(BUCKETS)])
            lines.append(f'albert_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {total}')
            lines.append(f'albert_request_duration_seconds_sum{{route="{route}"}} {hist[-1]:.6f}')
            lines.append(f'albert_request_duration_seconds_count{{route="{route}"}} {total}')
        lines += ["# HELP albert_upstream_errors_total Failures talking to replicas.",
                  "# TYPE albert_upstream_errors_total counter"]
        for (model, kind), n in sorted(self.upstream_errors.items()):
            lines.append(f'albert_upstream_errors_total{{model="{_label(model)}",kind="{_label(kind)}"}} {n}')
        lines += ["# HELP albert_tokens_total Tokens charged to keys (usage reported by replicas, "
                  "else relayed or reserved).",
                  "# TYPE albert_tokens_total counter"]
        for (key, model), n in sorted(self.tokens.items()):
            lines.append(f'albert_tokens_total{{key="{_label(key)}",model="{_label(model)}"}} {n}')
        lines += ["# HELP albert_rejections_total Requests the gateway refused (4xx), by key name, "
                  "status and reason.",
                  "# TYPE albert_rejections_total counter"]
        for (key, status, reason), n in sorted(self.rejections.items()):
            lines.append(f'albert_rejections_total{{key="{_label(key)}",status="{status}",'
                         f'reason="{_label(reason)}"}} {n}')
        lines += ["# HELP albert_retries_total Requests retried on another replica.",
                  "# TYPE albert_retries_total counter", f"albert_retries_total {self.retries}",
                  "# HELP albert_in_flight Requests being answered.",
                  "# TYPE albert_in_flight gauge", f"albert_in_flight {self.in_flight}",
                  "# HELP albert_reloads_total Keys and whitelist reloads (SIGHUP).",
                  "# TYPE albert_reloads_total counter", f"albert_reloads_total {self.reloads}",
                  "# HELP albert_reload_failures_total Reloads refused (a broken file).",
                  "# TYPE albert_reload_failures_total counter",
                  f"albert_reload_failures_total {self.reload_failures}",
                  "# HELP albert_whitelist_entries Entries of the loaded whitelist.",
                  "# TYPE albert_whitelist_entries gauge",
                  f"albert_whitelist_entries {whitelist_entries}",
                  "# HELP albert_replica_healthy 1 if the replica serves, 0 if ejected.",
                  "# TYPE albert_replica_healthy gauge"]
        for rep in router.replicas:
            lines.append(f'albert_replica_healthy{{model="{_label(rep.model)}",'
                         f'replica="{_label(rep.url)}"}} {int(rep.healthy)}')
        lines += ["# HELP albert_replica_outstanding Requests in flight to the replica.",
                  "# TYPE albert_replica_outstanding gauge"]
        for rep in router.replicas:
            lines.append(f'albert_replica_outstanding{{model="{_label(rep.model)}",'
                         f'replica="{_label(rep.url)}"}} {rep.outstanding}')
        lines += ["# HELP albert_process_info The gateway process (one per worker).",
                  "# TYPE albert_process_info gauge",
                  f'albert_process_info{{pid="{os.getpid()}"}} 1']
        return ("\n".join(lines) + "\n").encode()
