"""The text-format parser and histogram_quantile on a real vLLM 0.32 scrape; quantiles checked
against Prometheus' own (promtool), top's figures per model."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pyalbert.observability import exposition as ex
from pyalbert.observability import figures as f
from pyalbert.observability import promql as q
from pyalbert.observability.render import Target

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"
IDLE = (FIXTURES / "metrics-0.32-idle.txt").read_text()
AFTER = (FIXTURES / "metrics-0.32-after-traffic.txt").read_text()


def test_parses_the_real_vllm_scrape():
    samples = ex.parse(AFTER)
    lines = [x for x in AFTER.splitlines() if x and not x.startswith("#")]
    assert len(samples) == len(lines) > 300
    assert ex.total(samples, q.VLLM_GENERATION_TOKENS) == 448.0
    assert ex.total(samples, q.VLLM_PROMPT_TOKENS) == 172.0
    assert ex.total(samples, q.VLLM_RUNNING) == 0.0
    assert ex.total(samples, "vllm:no_such_metric") is None
    ttft = ex.buckets_of(samples, q.VLLM_TTFT)
    assert ttft[5.0] == 8.0 and ttft[2.5] == 0.0 and ttft[math.inf] == 8.0
    success = {s.label("finished_reason"): s.value for s in samples if s.name == q.VLLM_SUCCESS}
    assert success["length"] == 8.0 and sum(success.values()) == 8.0
    kv = next(s for s in samples if s.name == q.VLLM_KV_CACHE)
    assert dict(kv.labels) == {"engine": "0", "model_name": "smollm2"}


def test_every_metric_the_rules_read_is_in_the_real_scrape():
    names = {s.name for s in ex.parse(AFTER)}
    for metric in (q.VLLM_PROMPT_TOKENS, q.VLLM_GENERATION_TOKENS, q.VLLM_RUNNING, q.VLLM_WAITING,
                   q.VLLM_KV_CACHE, q.VLLM_SUCCESS):
        assert metric in names
    for histogram in (q.VLLM_TTFT, q.VLLM_ITL, q.VLLM_E2E):
        assert {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"} <= names


@pytest.mark.parametrize("text,expected", [
    ('a 1', [("a", {}, 1.0)]),
    ('a{} 2 1700000000000', [("a", {}, 2.0)]),
    ('b{x="1",y="two words"} +Inf', [("b", {"x": "1", "y": "two words"}, math.inf)]),
    ('c{p="a\\"b\\\\c\\nd"} -1.5e3', [("c", {"p": 'a"b\\c\nd'}, -1500.0)]),
    ('d{le="0.5",} 3', [("d", {"le": "0.5"}, 3.0)]),
    ('# HELP e x\n# TYPE e counter\n\ne_total 7\n', [("e_total", {}, 7.0)]),
    ('f{path="}{ x"} 1', [("f", {"path": "}{ x"}, 1.0)]),
], ids=["plain", "timestamp", "inf-and-spaces", "escapes", "trailing-comma", "comments", "braces-in-value"])
def test_parse_cases(text, expected):
    assert [(s.name, dict(s.labels), s.value) for s in ex.parse(text)] == expected


def test_parse_nan():
    (s,) = ex.parse("g NaN")
    assert math.isnan(s.value)


@pytest.mark.parametrize("text", ['a', 'a{x="1"}', 'a{x="1} 2', "a{x=1} 2", "a one", "a 1 2 3"],
                         ids=["no-value", "labels-no-value", "unterminated", "unquoted", "word", "extra"])
def test_parse_refuses_garbage(text):
    with pytest.raises(ex.ParseError):
        ex.parse(text)


@pytest.mark.parametrize("q_,buckets,expected", [
    (0.5, {1.0: 0, 2.0: 10, math.inf: 10}, 1.5),
    (0.9, {0.1: 5, 0.2: 10, math.inf: 10}, 0.18),
    (0.5, {0.1: 10, math.inf: 10}, 0.05),  # first bucket: from 0
    (0.99, {1.0: 5, 2.0: 5, math.inf: 10}, 2.0),  # in +Inf: the highest finite bound
    (0.5, {1.0: 0, math.inf: 0}, math.nan),  # nothing observed
    (0.5, {1.0: 3}, math.nan),  # no +Inf bucket
    (0.5, {1.0: 6, 2.0: 4, math.inf: 10}, 0.8333333333333334),  # non-monotonic: evened out
    (1.5, {1.0: 1, math.inf: 1}, math.inf),
], ids=["middle", "interpolate", "first-bucket", "inf-bucket", "empty", "no-inf", "monotonic", "q>1"])
def test_histogram_quantile(q_, buckets, expected):
    got = ex.histogram_quantile(q_, buckets)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: ./scripts/bootstrap")
def test_histogram_quantile_agrees_with_prometheus_on_the_real_scrape(tmp_path):
    samples = ex.parse(AFTER)
    cases = []
    for histogram in (q.VLLM_TTFT, q.VLLM_ITL, q.VLLM_E2E):
        buckets = ex.buckets_of(samples, histogram)
        for quant in (0.5, 0.9, 0.95, 0.99):
            mine = ex.histogram_quantile(quant, buckets)
            assert not math.isnan(mine)
            cases.append({"expr": f"histogram_quantile({quant}, {histogram}_bucket)",
                          "eval_time": "0m", "exp_samples": [{"labels": "{}", "value": mine}]})
    series = [{"series": f'{s.name}{{le="{s.label("le")}"}}', "values": f"{s.value:g}"}
              for s in samples if s.name.endswith("_bucket") and s.name[:-7] in (q.VLLM_TTFT, q.VLLM_ITL, q.VLLM_E2E)]
    (tmp_path / "empty.yml").write_text("groups: []\n")
    (tmp_path / "t.yml").write_text(yaml.safe_dump({
        "rule_files": ["empty.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}))
    done = subprocess.run(["promtool", "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(cases) == 12


TARGETS = [Target("10.0.0.1:8001", "gpu-1", "albert-t-vllm-m", "m", "0"),
           Target("10.0.0.2:8001", "gpu-2", "albert-t-vllm-m-1", "m", "1"),
           Target("10.0.0.1:8002", "gpu-1", "albert-t-vllm-o", "o", "0")]


def test_figures_from_two_real_scrapes():
    idle, after = tuple(ex.parse(IDLE)), tuple(ex.parse(AFTER))
    before = {"albert-t-vllm-m": f.Scrape(100.0, idle), "albert-t-vllm-m-1": f.Scrape(100.0, idle)}
    now = {"albert-t-vllm-m": f.Scrape(110.0, after), "albert-t-vllm-m-1": f.Scrape(110.0, after),
           "albert-t-vllm-o": f.Scrape(110.0, None, "ConnectError")}
    m, o = f.from_scrapes(TARGETS, now, before)
    assert (m.model, m.replicas, m.replicas_up) == ("m", 2, 2)
    assert m.generation_tps == pytest.approx(2 * 448 / 10)  # two replicas, 448 tokens each in 10 s
    assert m.prompt_tps == pytest.approx(2 * 172 / 10)
    assert m.ttft_p50 == pytest.approx(3.75)  # 16 first tokens, all in (2.5, 5]
    assert m.ttft_p95 == pytest.approx(2.5 + 2.5 * 0.95)
    assert (m.running, m.waiting, m.kv_cache) == (0.0, 0.0, 0.0)
    assert (o.model, o.replicas, o.replicas_up) == ("o", 1, 0)
    assert math.isnan(o.ttft_p50) and math.isnan(o.generation_tps)


def test_figures_from_one_scrape_have_latencies_but_no_rates():
    (m,) = f.from_scrapes(TARGETS[:1], {"albert-t-vllm-m": f.Scrape(1.0, tuple(ex.parse(AFTER)))})
    assert m.ttft_p50 == pytest.approx(3.75)
    assert math.isnan(m.generation_tps)


def test_figures_after_a_server_restart_use_the_new_counters():
    """Counters lower than before: the server restarted; no negative rates, no bogus quantile."""
    idle, after = tuple(ex.parse(IDLE)), tuple(ex.parse(AFTER))
    (m,) = f.from_scrapes(TARGETS[:1], {"albert-t-vllm-m": f.Scrape(2.0, idle)},
                          {"albert-t-vllm-m": f.Scrape(1.0, after)})
    assert math.isnan(m.generation_tps)
    assert math.isnan(m.ttft_p50)  # the new server has observed nothing yet


def test_figures_from_prometheus_vectors():
    results = {
        q.TTFT_P50: [{"metric": {"model": "m"}, "value": [1.0, "0.25"]}],
        q.TTFT_P95: [{"metric": {"model": "m"}, "value": [1.0, "NaN"]}],
        q.GENERATION_TPS: [{"metric": {"model": "m"}, "value": [1.0, "44.8"]}],
        q.REPLICAS_UP: [{"metric": {"model": "m"}, "value": [1.0, "1"]}],
        q.REPLICAS: [{"metric": {"model": "m"}, "value": [1.0, "2"]}],
        q.KV_CACHE: [{"metric": {"model": "m"}, "value": [1.0, "0.5"]}],
    }
    m, o = f.from_query_results(results, models=["o", "m"])
    assert (m.model, m.ttft_p50, m.generation_tps, m.replicas_up, m.replicas, m.kv_cache) == \
        ("m", 0.25, 44.8, 1, 2, 0.5)
    assert math.isnan(m.ttft_p95) and math.isnan(m.waiting)
    assert (o.model, o.replicas) == ("o", 0)


def test_top_queries_are_the_recording_rules_expressions():
    queries = f.top_queries("1m")
    assert queries[q.TTFT_P95] == q.figures("1m")[q.TTFT_P95]
    assert set(queries) == set(f._FIELDS)
