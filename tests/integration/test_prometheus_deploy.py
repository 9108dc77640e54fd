"""The environment's Prometheus deployed by the engine (venv runtime: Debian's prometheus under
``albert supervise``; no Prometheus image exists offline for the docker runtime): every target of
the plan answers ``up``, a second deploy is a no-op, and a config promtool refuses fails the
deploy before anything stops."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest

from pyalbert.engine.operations import deploy_env, rollback_env
from pyalbert.engine.status_figures import status_figures
from tests.integration.test_venv_runtime import wait_for

pytestmark = [
    pytest.mark.parametrize("runtime_host", ["venv"], indirect=True),
    pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus is missing"),
]

MODELS = {"m-a": {"model": "org/a", "port": 18401}, "m-b": {"model": "org/b", "port": 18402}}
METRICS = "[metrics]\nenabled = true\nport = 18490\nscrape_interval = '1s'\nevaluation_interval = '1s'\n"


def up(env) -> dict[str, float]:
    """job/instance -> value of ``up``, asked from Prometheus on the host; the idle spare slots
    (where a replace without downtime would start a server) are scraped too, and left out here."""
    query = 'up{unit!~".*-spare"}'
    out = env.host.run(["curl", "-fsS", "--get", "--data-urlencode", f"query={query}",
                        "http://127.0.0.1:18490/api/v1/query"]).stdout
    return {f"{r['metric']['job']}/{r['metric']['instance']}": float(r["value"][1])
            for r in json.loads(out)["data"]["result"]}


def ttft_threshold(env) -> str:
    """The TTFT alert's expression as Prometheus serves it now (its threshold is the last token)."""
    out = env.host.run(["curl", "-fsS", "http://127.0.0.1:18490/api/v1/rules?type=alert"]).stdout
    rules = [r for g in json.loads(out)["data"]["groups"] for r in g["rules"]]
    return next(r["query"] for r in rules if r["name"] == "AlbertSlowFirstToken").split()[-1]


def test_deploy_brings_prometheus_up_scraping_every_target_then_noop_then_refuses_bad_rules(env):
    env.write(MODELS, api_port=18480, extra=METRICS)
    assert [r.status for r in deploy_env(env.spec(), quiet=True)] == ["deployed"]
    n = env.name
    assert f"albert-{n}-prometheus" in env.running()
    # every vLLM server, the gateway and Prometheus itself answer their scrape
    seen: list[dict] = [{}]

    def all_up():
        seen[0] = up(env)
        return seen[0] if len(seen[0]) >= 4 and all(v == 1 for v in seen[0].values()) else None

    with contextlib.suppress(AssertionError):
        wait_for(all_up, timeout=60)
    targets = seen[0]
    assert targets and all(v == 1 for v in targets.values()), targets
    assert sum(1 for k in targets if "18401" in k or "18402" in k) == 2

    def spare_targets():  # each server's spare port is a target too (down: nothing runs there)
        out = env.host.run(["curl", "-fsS", "--get", "--data-urlencode", 'query=up{unit=~".*-spare"}',
                            "http://127.0.0.1:18490/api/v1/query"]).stdout
        return json.loads(out)["data"]["result"]

    with contextlib.suppress(AssertionError):  # scraped at their own offset in the interval
        wait_for(lambda: len(spare_targets()) == 2 or None, timeout=30)
    assert sorted(float(s["value"][1]) for s in spare_targets()) == [0.0, 0.0]
    assert any("18480" in k for k in targets)
    # fab status's figures per model come from this Prometheus, asked on its host
    source, rows = status_figures(env.spec())
    assert source.startswith("Prometheus on ")
    assert {(r.model, r.replicas_up, r.replicas) for r in rows} == {("m-a", 1, 1), ("m-b", 1, 1)}
    data = env.host.run(f"ls {env.base}/prometheus-{n}/data").stdout
    assert "wal" in data.split()

    first = env.running()
    again = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in again] == ["unchanged"] and env.running() == first

    # a new threshold changes its files, not its command: reloaded in place (same process), and a
    # rollback reloads the previous files
    name, before = f"albert-{n}-prometheus", ttft_threshold(env)
    pid = env.supervised()[name]["pid"]
    env.write(MODELS, api_port=18480, extra=METRICS + "[metrics.alerts]\nttft_p95_s = 7.5\n")
    assert [r.status for r in deploy_env(env.spec(), quiet=True)] == ["deployed"]
    assert env.supervised()[name]["pid"] == pid and ttft_threshold(env) == "7.5" != before
    assert [r.status for r in rollback_env(env.spec(), quiet=True)] == ["rolled back to"]
    assert env.supervised()[name]["pid"] == pid and ttft_threshold(env) == before
    first = env.running()

    # a rate window promtool refuses: the deploy fails in the preflight, nothing restarts
    env.write(MODELS, api_port=18480, extra=METRICS + "[metrics.alerts]\nrate_window = '0s'\n")
    with pytest.raises(Exception, match="promtool refused"):
        deploy_env(env.spec(), quiet=True)
    assert env.running() == first
    assert all(v == 1 for v in up(env).values())
