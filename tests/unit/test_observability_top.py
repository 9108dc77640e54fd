"""``albert top --once`` against servers replaying a real vLLM 0.32 /metrics over HTTP."""

from __future__ import annotations

import threading

import pytest

from pyalbert.cli import main
from tests.support.metrics_replay import Replay, exposition


@pytest.fixture
def replica():
    server = Replay(("127.0.0.1", 0), "smollm2")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(config_factory, replica):
    config_factory.env("""
        [[hosts]]
        name = "local"
        address = "127.0.0.1"
        gpus = 0
        [api]
        port = 8080
    """)
    config_factory.routing({
        "smollm2": {"model": "HuggingFaceTB/SmolLM2-135M", "port": replica.server_address[1]},
        "gone": {"model": "org/gone", "port": 1024},  # nothing listens there
    })
    return config_factory.root


def test_top_once_reads_every_server_and_shows_figures_per_model(env, replica, capsys):
    assert main(["top", "--env", "test", "--config-dir", str(env), "--once", "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") == 10}
    assert set(rows) == {"smollm2", "gone"}
    up, p50, p95, tok_in, tok_out, running, waiting, kv = rows["smollm2"]
    assert (up, p50, p95, running, waiting, kv) == ("1/1", "3750 ms", "4875 ms", "0", "0", "0 %")
    assert float(tok_out) > 0 and float(tok_in) > 0  # two scrapes: the replay moved on
    assert rows["gone"] == ["0/1", "-", "-", "-", "-", "-", "-", "-"]
    assert replica.scrapes == 2


def test_replay_grows_counters_at_the_real_rate():
    from pyalbert.observability import exposition as ex
    from pyalbert.observability import promql as q

    s0, s2 = ex.parse(exposition(0)), ex.parse(exposition(2))
    assert ex.total(s0, q.VLLM_GENERATION_TOKENS) == 0.0
    assert ex.total(s2, q.VLLM_GENERATION_TOKENS) == 2 * 448.0
    assert ex.buckets_of(s2, q.VLLM_TTFT)[5.0] == 16.0
    assert ex.total(s2, q.VLLM_KV_CACHE) == ex.total(s0, q.VLLM_KV_CACHE)


def test_top_says_when_prometheus_does_not_answer(env, capsys):
    code = main(["top", "--env", "test", "--config-dir", str(env), "--once",
                 "--prometheus", "http://127.0.0.1:1"])
    assert code == 1
    assert "Prometheus at http://127.0.0.1:1 does not answer" in capsys.readouterr().err
