"""``fab status``'s headline figures per model: from the environment's Prometheus (asked on its
host) when ``[metrics]`` is enabled, else from each vLLM server's /metrics read on its host."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pyalbert.config import load_spec
from pyalbert.engine.status_figures import status_figures
from pyalbert.errors import AlbertError
from pyalbert.observability import figures as f
from pyalbert.observability import promql as q
from pyalbert.remote import DryRunner, Result

SCRAPE = (Path(__file__).parents[1] / "fixtures/vllm/metrics-0.32-after-traffic.txt").read_text()
ENV = """
    [[hosts]]
    name = "gpu-1"
    address = "10.0.0.1"
    gpus = 1
    services = ["vllm"]
    [[hosts]]
    name = "cpu-1"
    address = "10.0.0.2"
    services = ["api"]
"""


class Host(DryRunner):
    def __init__(self, name: str, answer):
        super().__init__(name)
        self.answer = answer

    def run(self, cmd, *, check=True, timeout=None):
        self.commands.append(cmd)
        out = self.answer(cmd.tokens)
        return Result(cmd, 0 if out is not None else 7, out or "", "" if out else "refused")

    def close(self):
        pass


def spec_of(config_factory, extra: str = ""):
    config_factory.env(ENV + extra)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4},
                            "big": {"model": "org/big", "port": 8002, "gpu_mem_use": 0.4}})
    return load_spec("test", config_factory.root)


def hosts(answers: dict):
    made: dict[str, Host] = {}

    def factory(host):
        made[host.name] = Host(host.name, answers[host.name])
        return made[host.name]
    return factory, made


def vector(model: str, value: float) -> list[dict]:
    return [{"metric": {"model": model}, "value": [0, str(value)]}]


def test_from_the_prometheus_of_the_environment_asked_on_its_host(config_factory):
    spec = spec_of(config_factory, "[metrics]\nenabled = true\nport = 9091\n")
    exprs = {expr: name for name, expr in f.top_queries("5m").items()}
    canned = {q.TTFT_P95: vector("small", 0.25), q.REPLICAS_UP: vector("small", 1),
              q.REPLICAS: vector("small", 1) + vector("big", 1), q.GENERATION_TPS: vector("small", 42)}

    def prometheus(tokens):
        assert tokens[-1] == "http://127.0.0.1:9091/api/v1/query"
        name = exprs[tokens[tokens.index("--data-urlencode") + 1].removeprefix("query=")]
        return json.dumps({"status": "success", "data": {"resultType": "vector",
                                                        "result": canned.get(name, [])}})
    factory, made = hosts({"cpu-1": prometheus})
    source, rows = status_figures(spec, factory)
    assert source == "Prometheus on cpu-1 (window 5m)" and set(made) == {"cpu-1"}
    by = {r.model: r for r in rows}
    assert (by["small"].replicas_up, by["small"].replicas, by["small"].ttft_p95,
            by["small"].generation_tps) == (1, 1, 0.25, 42.0)
    assert (by["big"].replicas_up, by["big"].replicas) == (0, 1) and math.isnan(by["big"].ttft_p95)


def test_a_prometheus_that_does_not_answer_is_named(config_factory):
    spec = spec_of(config_factory, "[metrics]\nenabled = true\n")
    factory, _ = hosts({"cpu-1": lambda tokens: None})
    with pytest.raises(AlbertError, match="the Prometheus of host cpu-1 .port 9090. did not answer"):
        status_figures(spec, factory)


def test_without_prometheus_each_server_is_read_on_its_host(config_factory):
    spec = spec_of(config_factory)
    asked = []

    def gpu(tokens):
        asked.append(tokens[-1])
        return SCRAPE if tokens[-1] == "http://10.0.0.1:8001/metrics" else None  # big is down
    factory, made = hosts({"gpu-1": gpu})
    source, rows = status_figures(spec, factory)
    assert source == "2 vLLM server(s), /metrics read once (no rates)" and set(made) == {"gpu-1"}
    # each server on its port and its spare port (where a replace without downtime moves it)
    assert sorted(asked) == ["http://10.0.0.1:28001/metrics", "http://10.0.0.1:28002/metrics",
                             "http://10.0.0.1:8001/metrics", "http://10.0.0.1:8002/metrics"]
    by = {r.model: r for r in rows}
    assert (by["small"].replicas_up, by["small"].replicas) == (1, 1)
    assert by["small"].ttft_p95 > 0 and by["small"].running == 0 and math.isnan(by["small"].generation_tps)
    assert (by["big"].replicas_up, by["big"].replicas) == (0, 1) and math.isnan(by["big"].ttft_p95)


def test_a_replica_moved_to_its_spare_port_counts_once_and_up(config_factory):
    spec = spec_of(config_factory)
    both = {"http://10.0.0.1:28001/metrics", "http://10.0.0.1:8002/metrics", "http://10.0.0.1:28002/metrics"}
    factory, _ = hosts({"gpu-1": lambda tokens: SCRAPE if tokens[-1] in both else None})
    _, rows = status_figures(spec, factory)
    by = {r.model: r for r in rows}
    assert (by["small"].replicas_up, by["small"].replicas) == (1, 1)  # served from the spare port
    assert (by["big"].replicas_up, by["big"].replicas) == (1, 1)  # both slots answer: one replica
