"""Recording and alert rules as data, thresholds from :class:`AlertsSpec`, and their unit tests.

:func:`rules` is the rule file (``promtool check rules``); :func:`rule_tests` is a
``promtool test rules`` file that feeds series to every alert and says which must fire, so a
threshold or expression that stops matching fails before it reaches a host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from pyalbert.observability import promql as q
from pyalbert.observability.spec import AlertsSpec

RULES_FILE = "albert-rules.yml"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def as_rule(self) -> dict:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "description": self.description},
        }


def alerts(a: AlertsSpec) -> list[Alert]:
    return [
        Alert("AlbertModelDown",
              f'({q.REPLICAS_UP} == 0) or (max by (model) ({q.API_REPLICA_HEALTHY}) == 0)',
              a.model_down_for, "critical",
              "model {{ $labels.model }}: no replica serves",
              "No vLLM server of {{ $labels.model }} answers /metrics, or the gateway has "
              "ejected every replica, for " + a.model_down_for + "."),
        Alert("AlbertReplicaDown", 'max by (model, host, replica) (up{job="vllm"}) == 0', a.model_down_for, "warning",
              "model {{ $labels.model }}: replica {{ $labels.replica }} on {{ $labels.host }} is down",
              "Neither slot of the vLLM server (its port nor its spare port) answers /metrics."),
        Alert("AlbertApiDown", 'up{job="api"} == 0', a.model_down_for, "critical",
              "gateway on {{ $labels.host }} is down",
              "The gateway's /metrics does not answer (or refuses the scrape key)."),
        Alert("AlbertHighErrorRatio", f"{q.API_5XX_RATIO} > {a.error_ratio:g}", a.error_ratio_for,
              "critical", f"model {{{{ $labels.model }}}}: over {a.error_ratio:.0%} of answers are 5xx",
              f"More than {a.error_ratio:.0%} of the gateway's answers for this model are 5xx."),
        Alert("AlbertSlowFirstToken", f"{q.TTFT_P95} > {a.ttft_p95_s:g}", a.ttft_for, "warning",
              f"model {{{{ $labels.model }}}}: time to first token p95 over {a.ttft_p95_s:g} s",
              f"The 95th percentile of time to first token is over {a.ttft_p95_s:g} s."),
        Alert("AlbertKvCacheFull", f"{q.VLLM_KV_CACHE} > {a.kv_cache_usage:g}", a.kv_cache_for,
              "warning",
              "model {{ $labels.model }}: KV cache of replica {{ $labels.replica }} on "
              f"{{{{ $labels.host }}}} over {a.kv_cache_usage:.0%} full",
              "Requests will queue or be preempted: add replicas or lower max_model_len."),
        Alert("AlbertRequestsPiling",
              f"{q.WAITING} > {a.waiting_requests} and deriv({q.WAITING}[{a.rate_window}]) > 0",
              a.waiting_for, "warning",
              f"model {{{{ $labels.model }}}}: over {a.waiting_requests} requests waiting, and growing",
              "Waiting requests keep growing: the model cannot keep up with its traffic."),
        Alert("AlbertGpuLeaseOverdue",
              f"time() - {q.GPU_LEASE_EXPIRY} > {_seconds(a.gpu_lease_grace)}", "0s", "warning",
              "GPU lease of {{ $labels.env }} held past its time by pipeline {{ $labels.pipeline }}",
              "The lease expired more than " + a.gpu_lease_grace + " ago and nobody released it: "
              "run `fab unlink-gpu` or check the pipeline."),
        Alert("AlbertKeyRateLimited",
              f'sum by (key) (rate({q.API_REJECTIONS}{{status="429"}}[{a.rate_window}])) '
              f"> {a.rejections_per_s:g}",
              a.rejections_for, "info",
              f"key {{{{ $labels.key }}}} is rate-limited (over {a.rejections_per_s:g} rejections/s)",
              "A client keeps hitting its key's rate limit: raise it or talk to the client."),
    ]


def _seconds(duration: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    for unit in ("ms", "s", "m", "h", "d", "w", "y"):
        if duration.endswith(unit) and duration[: -len(unit)].isdigit():
            return int(int(duration[: -len(unit)]) * units[unit])
    raise ValueError(f"not a duration: {duration!r}")


def recording(a: AlertsSpec) -> list[dict]:
    return [{"record": name, "expr": expr} for name, expr in q.figures(a.rate_window).items()]


def rules(a: AlertsSpec) -> dict:
    """The rule file's document."""
    return {"groups": [
        {"name": "albert-recording", "rules": recording(a)},
        {"name": "albert-alerts", "rules": [al.as_rule() for al in alerts(a)]},
    ]}


def dump(doc: dict) -> str:
    return "# rendered by pyalbert.observability: do not edit\n" + yaml.safe_dump(
        doc, sort_keys=False, width=1000, allow_unicode=True)


# -- promtool test rules -------------------------------------------------------------------------
def _vllm(metric: str, model: str = "m1", replica: str = "0", host: str = "gpu-1",
          port: int = 8000) -> str:
    return (f'{metric}{{job="vllm",model="{model}",host="{host}",replica="{replica}",'
            f'instance="{host}:{port}"}}')


_LABEL_RE = re.compile(r"\{\{ \$labels\.([a-zA-Z_][a-zA-Z0-9_]*) \}\}")


def expand(template: str, labels: dict[str, str]) -> str:
    """An annotation as Prometheus renders it (our annotations use ``$labels`` only)."""
    if "{{" in _LABEL_RE.sub("", template):
        raise ValueError(f"annotation uses more than $labels: {template!r}")
    return _LABEL_RE.sub(lambda m: labels.get(m.group(1), ""), template)


def _fires(alert: Alert, at: str, labels: dict[str, str]) -> dict:
    return {"eval_time": at, "alertname": alert.name, "exp_alerts": [
        {"exp_labels": {"severity": alert.severity, **labels},
         "exp_annotations": {"summary": expand(alert.summary, labels),
                             "description": expand(alert.description, labels)}}]}


def _quiet(alert: Alert, at: str) -> dict:
    return {"eval_time": at, "alertname": alert.name, "exp_alerts": []}


def rule_tests(a: AlertsSpec, rule_file: str = RULES_FILE) -> dict:
    """A ``promtool test rules`` document: each alert fires on a bad series, stays quiet on a
    good one, and waits its ``for:`` window. Samples come every ``step`` seconds, at least four
    per rate window, so the tests hold for any thresholds and windows of the settings."""
    by = {al.name: al for al in alerts(a)}
    rate_s = _seconds(a.rate_window)
    step = max(1, min(60, rate_s // 4))
    down_s = _seconds(a.model_down_for)
    grace_s = _seconds(a.gpu_lease_grace)
    long_s = max(_seconds(x) for x in (a.error_ratio_for, a.ttft_for, a.kv_cache_for,
                                       a.waiting_for, a.rejections_for)) + rate_s + 5 * step
    n = -(-long_s // step)  # samples after the first
    at_end = f"{n * step}s"
    bad_ratio = min(a.error_ratio * 2, 1.0)  # a model whose 5xx share is twice the threshold
    ttft_bad = a.ttft_p95_s * 2
    # evaluations happen every step: times are multiples of it (promtool checks alerts there)
    fired_down = step * (-(-down_s // step) + 2)  # down from the 2nd sample, then for: elapsed
    n_down = fired_down // step + 2
    n_lease = (grace_s + 2 * step) // step + 2

    def per_step(per_second: float) -> str:
        return f"{per_second * step:g}"

    model_down = [_fires(by["AlbertModelDown"], f"{fired_down}s", {"model": "m1"})]
    if down_s > 0:  # down, but not for long enough yet
        model_down.insert(0, _quiet(by["AlbertModelDown"], f"{step}s"))
    tests = [
        {   # model down: m1 has no replica up (its one target answers no more), m2 still serves
            "input_series": [
                {"series": _vllm("up", "m1"), "values": f"1 0x{n_down}"},
                {"series": _vllm("up", "m2", host="gpu-2"), "values": f"1x{n_down}"},
            ],
            "alert_rule_test": [
                *model_down,
                _fires(by["AlbertReplicaDown"], f"{fired_down}s", {
                    "model": "m1", "host": "gpu-1", "replica": "0"}),
            ],
        },
        {   # m1's replica moved to its spare port (a replace without downtime): its first port
            # answers no more, the spare does; m2's idle spare slot never answers: nothing fires
            "input_series": [
                {"series": _vllm("up", "m1"), "values": f"1 0x{n_down}"},
                {"series": _vllm("up", "m1", port=26000), "values": f"0 1x{n_down}"},
                {"series": _vllm("up", "m2", host="gpu-2"), "values": f"1x{n_down}"},
                {"series": _vllm("up", "m2", host="gpu-2", port=26000), "values": f"0x{n_down}"},
            ],
            "alert_rule_test": [
                _quiet(by["AlbertModelDown"], f"{fired_down}s"),
                _quiet(by["AlbertReplicaDown"], f"{fired_down}s"),
            ],
        },
        {   # the gateway ejected every replica of m1 although vLLM answers /metrics
            "input_series": [
                {"series": _vllm("up", "m1"), "values": f"1x{n_down}"},
                {"series": f'{q.API_REPLICA_HEALTHY}{{job="api",model="m1",replica="http://a:8000"}}',
                 "values": f"0x{n_down}"},
                {"series": f'{q.API_REPLICA_HEALTHY}{{job="api",model="m1",replica="http://b:8000"}}',
                 "values": f"1 0x{n_down}"},
            ],
            "alert_rule_test": [
                _fires(by["AlbertModelDown"], f"{fired_down}s", {"model": "m1"}),
                _quiet(by["AlbertReplicaDown"], f"{fired_down}s"),
            ],
        },
        {   # 5xx ratio over the threshold for m1, none for m2 (1 request a second each)
            "input_series": [
                {"series": f'{q.API_REQUESTS}{{job="api",route="chat",model="m1",status="200"}}',
                 "values": f"0+{per_step(1 - bad_ratio)}x{n}"},
                {"series": f'{q.API_REQUESTS}{{job="api",route="chat",model="m1",status="502"}}',
                 "values": f"0+{per_step(bad_ratio)}x{n}"},
                {"series": f'{q.API_REQUESTS}{{job="api",route="chat",model="m2",status="200"}}',
                 "values": f"0+{per_step(1)}x{n}"},
                # local routes never count: a flood of 404s on /other
                {"series": f'{q.API_REQUESTS}{{job="api",route="other",model="",status="404"}}',
                 "values": f"0+{per_step(10)}x{n}"},
            ],
            "alert_rule_test": [
                _fires(by["AlbertHighErrorRatio"], at_end, {"model": "m1"}),
            ],
        },
        {   # TTFT: m1's first tokens all take ttft_bad seconds, m2's 0.1 s
            "input_series": [
                *_histogram(q.VLLM_TTFT, "m1", ttft_bad, n, step),
                *_histogram(q.VLLM_TTFT, "m2", 0.1, n, step, host="gpu-2"),
            ],
            "alert_rule_test": [
                _fires(by["AlbertSlowFirstToken"], at_end, {"model": "m1"}),
            ],
        },
        {   # KV cache: replica 0 of m1 full, replica 1 at the threshold exactly (not over)
            "input_series": [
                {"series": _vllm(q.VLLM_KV_CACHE, "m1"),
                 "values": f"{min(a.kv_cache_usage + 0.05, 1.0):g}x{n}"},
                {"series": _vllm(q.VLLM_KV_CACHE, "m1", replica="1", host="gpu-2"),
                 "values": f"{a.kv_cache_usage:g}x{n}"},
            ],
            "alert_rule_test": [
                _fires(by["AlbertKvCacheFull"], at_end, {
                    "model": "m1", "job": "vllm", "host": "gpu-1", "replica": "0",
                    "instance": "gpu-1:8000"}),
            ],
        },
        {   # waiting requests: m1 grows by 1 a step past the threshold, m2 high but flat
            "input_series": [
                {"series": _vllm(q.VLLM_WAITING, "m1"), "values": f"{a.waiting_requests + 1}+1x{n}"},
                {"series": _vllm(q.VLLM_WAITING, "m2", host="gpu-2"),
                 "values": f"{a.waiting_requests + 50}x{n}"},
            ],
            "alert_rule_test": [
                _fires(by["AlbertRequestsPiling"], at_end, {"model": "m1"}),
            ],
        },
        {   # a GPU lease that expired at t=0 (promtool's clock starts at the epoch), one far off
            "input_series": [
                {"series": f'{q.GPU_LEASE_EXPIRY}{{env="staging",pipeline="41",who="ci"}}',
                 "values": f"0x{n_lease}"},
                {"series": f'{q.GPU_LEASE_EXPIRY}{{env="other",pipeline="42",who="ci"}}',
                 "values": f"{2 * grace_s + 3600}x{n_lease}"},
            ],
            "alert_rule_test": [
                _quiet(by["AlbertGpuLeaseOverdue"], f"{step * (grace_s // step)}s"),
                _fires(by["AlbertGpuLeaseOverdue"], f"{step * (grace_s // step + 1)}s",
                       {"env": "staging", "pipeline": "41", "who": "ci"}),
            ],
        },
        {   # key "noisy" rejected at twice the allowed rate, key "calm" at a tenth of it
            "input_series": [
                {"series": f'{q.API_REJECTIONS}{{job="api",key="noisy",status="429",reason="rate_limit_exceeded"}}',
                 "values": f"0+{per_step(a.rejections_per_s * 2)}x{n}"},
                {"series": f'{q.API_REJECTIONS}{{job="api",key="calm",status="429",reason="rate_limit_exceeded"}}',
                 "values": f"0+{per_step(a.rejections_per_s / 10)}x{n}"},
            ],
            "alert_rule_test": [
                _fires(by["AlbertKeyRateLimited"], at_end, {"key": "noisy"}),
            ],
        },
    ]
    for test in tests:
        test["interval"] = f"{step}s"
    return {"rule_files": [rule_file], "evaluation_interval": f"{step}s", "tests": tests}


def _histogram(name: str, model: str, seconds: float, samples: int, step: int,
               host: str = "gpu-1") -> list[dict]:
    """One observation a second, all of ``seconds``, in vLLM's TTFT buckets."""
    bounds = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
    out = []
    for le in (*[f"{b:g}" for b in bounds], "+Inf"):
        inside = le == "+Inf" or seconds <= float(le)
        out.append({"series": _vllm(f"{name}_bucket", model, host=host)[:-1] + f',le="{le}"}}',
                    "values": f"0+{step if inside else 0}x{samples}"})
    return out
