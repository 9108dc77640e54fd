"""A real Prometheus (Debian's binary) on the rendered config, scraping the real gateway and a
server replaying a real vLLM 0.32 /metrics: every recording rule and dashboard query answers,
``albert top`` reads it, killing the model server fires "model down", a bad rule file is refused
before the live folder changes, and a good change is reloaded gracefully.

Run it under the shared lock: ``flock /var/lock/albert-heavy.lock .venv/bin/python -m pytest
tests/integration/test_prometheus_live.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pyalbert.api.keys import hash_key
from pyalbert.cli import main
from pyalbert.config import load_spec
from pyalbert.errors import RemoteError
from pyalbert.observability import AlertsSpec, MetricsSpec, dashboard, render_all
from pyalbert.observability import commands as oc
from pyalbert.observability import promql as q
from pyalbert.observability import rules as r
from pyalbert.remote import LocalRunner
from tests.conftest import REPO, ConfigFactory
from tests.support.registry import free_port

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="Debian's prometheus is missing: ./scripts/bootstrap installs it")

CLIENT_KEY = "client-key-0123456789abcdef0123456789"
LIMITED_KEY = "limited-key-0123456789abcdef0123456789"
SCRAPE_KEY = "scrape-key-0123456789abcdef0123456789"
MODEL = "smollm2"
WINDOW = "30s"
ALERTS = AlertsSpec(model_down_for="5s", rate_window=WINDOW)
METRICS_KW = {"scrape_interval": "1s", "evaluation_interval": "1s", "alerts": ALERTS}


def wait_until(what: str, check, deadline_s: float = 90.0, every: float = 0.5):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"gave up waiting for {what} after {deadline_s:.0f} s (last: {last!r})")


class Proc:
    def __init__(self, argv: list[str], log: Path, **kw):
        self.log = log
        self.p = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True, **kw)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)


@pytest.fixture
def stack(tmp_path: Path):
    """Replay server + real gateway + the environment's rendered Prometheus files."""
    procs: list[Proc] = []
    vllm_port, api_port, prom_port = free_port(), free_port(), free_port()
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "team-a", "sha256": hash_key(CLIENT_KEY)},
        {"name": "limited", "sha256": hash_key(LIMITED_KEY), "requests_per_minute": 1},
        {"name": "prometheus", "sha256": hash_key(SCRAPE_KEY), "models": [], "scrape": True},
    ]}))
    key_file = tmp_path / "scrape-key"
    key_file.write_text(SCRAPE_KEY + "\n")
    key_file.chmod(0o600)

    config = ConfigFactory(tmp_path / "config")
    config.env(f"""
        [[hosts]]
        name = "local"
        address = "127.0.0.1"
        gpus = 0
        [api]
        port = {api_port}
    """)
    config.routing({MODEL: {"model": "HuggingFaceTB/SmolLM2-135M", "port": vllm_port}})
    plan = load_spec("test", config.root).placement
    metrics = MetricsSpec(port=prom_port, scrape_key_file=str(key_file), **METRICS_KW)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    replay = Proc([sys.executable, "-m", "tests.support.metrics_replay", "--port", str(vllm_port),
                   "--model", MODEL], tmp_path / "replay.log", cwd=REPO, env=env)
    procs.append(replay)
    albert = str(Path(sys.executable).with_name("albert"))
    api = Proc([albert, "api", "--backends", json.dumps({MODEL: [f"http://127.0.0.1:{vllm_port}"]}),
                "--host", "127.0.0.1", "--port", str(api_port), "--keys", str(keys),
                "--no-access-log"], tmp_path / "api.log", env=env)
    procs.append(api)
    api_url = f"http://127.0.0.1:{api_port}"
    wait_until("the gateway to be ready", lambda: _ok(f"{api_url}/ready"), 60)
    try:
        yield {"plan": plan, "metrics": metrics, "tmp": tmp_path, "api": api_url, "replay": replay,
               "prom_url": f"http://127.0.0.1:{prom_port}", "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def _ok(url: str, **kw) -> bool:
    try:
        return httpx.get(url, timeout=2, **kw).status_code == 200
    except httpx.HTTPError:
        return False


def query(prom: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def firing(prom: str, name: str) -> list[dict]:
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


def expressions() -> dict[str, str]:
    """Every recording rule (by its recorded name) and every dashboard query, as Grafana runs them."""
    out = {name: name for name in q.figures()}
    for title, expr in dashboard.queries():
        out[f"dashboard {title}: {expr}"] = (expr.replace("$__rate_interval", WINDOW)
                                             .replace('"$model"', '".*"'))
    return out


def pending(expr: str) -> bool:
    """Reads a metric the local stack does not expose (see promql.PENDING): no series expected."""
    return any(m in expr for m in q.PENDING)


def test_prometheus_scrapes_the_plan_answers_every_query_and_fires_model_down(stack):
    tmp, prom = stack["tmp"], stack["prom_url"]
    live = tmp / "etc-prometheus"
    runner = LocalRunner()

    # install through the checked path, start the real server the way the engine would
    for step in oc.install(render_all(stack["plan"], stack["metrics"]), str(live)):
        runner.run(step, timeout=120)
    serve = oc.serve(stack["metrics"], str(live / "prometheus.yml"), str(tmp / "tsdb"),
                     listen=prom.removeprefix("http://"))
    stack["procs"].append(Proc(shlex.split(serve.render()), tmp / "prometheus.log"))
    wait_until("Prometheus to be ready", lambda: runner.run(oc.is_ready(prom), check=False).ok, 60)

    # both jobs up: the gateway's /metrics took the scrape key from the file
    def targets_up():
        active = httpx.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active} == {
            "vllm": "up", "api": "up", "prometheus": "up"} and active
    active = wait_until("every target up", targets_up, 60)
    assert httpx.get(f"{stack['api']}/metrics", timeout=10).status_code == 401  # the key was needed
    vllm_target = next(t for t in active if t["labels"]["job"] == "vllm")
    assert {k: vllm_target["labels"][k] for k in ("model", "host", "replica")} == {
        "model": MODEL, "host": "local", "replica": "0"}

    # traffic with the openai client: answers for team-a, 429s for the limited key; team-a
    # keeps a trickle going until the kill, so ratios and percentiles have requests in their window
    from openai import OpenAI, RateLimitError

    client = OpenAI(base_url=f"{stack['api']}/v1", api_key=CLIENT_KEY, max_retries=0)
    limited = OpenAI(base_url=f"{stack['api']}/v1", api_key=LIMITED_KEY, max_retries=0)
    rejected = 0
    for _ in range(3):
        try:
            limited.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        except RateLimitError:
            rejected += 1
    assert rejected == 2
    stop, failures = threading.Event(), []

    def trickle():
        while not stop.is_set():
            try:
                answer = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
                assert answer.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
            stop.wait(0.3)
    traffic = threading.Thread(target=trickle, daemon=True)
    traffic.start()

    # every series carries model, host, replica (vLLM) / host (gateway)
    series = query(prom, '{job="vllm"}')
    assert series and all({"model", "host", "replica"} <= set(s["metric"]) for s in series)
    assert not any(s["metric"]["__name__"].endswith("_created") for s in series)  # dropped
    assert all(s["metric"]["host"] == "local" for s in query(prom, '{job="api"}'))

    # every recording rule and dashboard query answers (those on pending metrics: nothing)
    exprs = expressions()
    upstream = {k: v for k, v in exprs.items() if q.API_UPSTREAM_ERRORS in v}

    def missing():
        return [name for name, expr in exprs.items()
                if name not in upstream and not pending(expr) and not query(prom, expr)]
    wait_until("every recording rule and dashboard query to return series",
               lambda: not missing() or None, 90)
    for name, expr in exprs.items():
        if pending(expr):
            assert query(prom, expr) == [], f"{name} now has data: drop it from promql.PENDING"
    figures = {name: query(prom, name) for name in (q.TTFT_P95, q.GENERATION_TPS, q.API_5XX_RATIO)}
    assert float(figures[q.TTFT_P95][0]["value"][1]) == pytest.approx(2.5 + 2.5 * 0.95)
    assert float(figures[q.GENERATION_TPS][0]["value"][1]) > 0
    assert float(figures[q.API_5XX_RATIO][0]["value"][1]) == 0.0
    assert firing(prom, "AlbertModelDown") == []
    # the limited key's 429s, by its name (never its secret)
    rejected_by = {(s["metric"].get("key", ""), s["metric"]["status"])  # "": before a key is read
                   for s in query(prom, q.API_REJECTIONS_RATE)}
    assert {("limited", "429"), ("", "401")} <= rejected_by  # 401: /metrics asked without the key
    assert LIMITED_KEY not in json.dumps(query(prom, q.API_REJECTIONS))

    # albert top reads the same figures from this Prometheus
    config_dir = stack["plan"].spec.config_dir
    assert main(["top", "--env", "test", "--config-dir", str(config_dir), "--prometheus", prom,
                 "--window", WINDOW, "--once"]) == 0

    # a bad rule file is refused before the live folder changes; Prometheus keeps its rules
    before = {p.name: p.read_text() for p in live.iterdir()}
    broken = render_all(stack["plan"], stack["metrics"])
    broken[r.RULES_FILE] = broken[r.RULES_FILE].replace("(up{job=\"vllm\"}) == 0", "(up{job=")
    assert broken[r.RULES_FILE] != before[r.RULES_FILE]
    with pytest.raises(RemoteError, match="promtool check config"):
        for step in oc.install(broken, str(live)):
            runner.run(step, timeout=120)
    assert {p.name: p.read_text() for p in live.iterdir()} == before

    # a good change goes in and is reloaded without a restart
    tighter = MetricsSpec(**{**METRICS_KW, "port": stack["metrics"].port,
                             "scrape_key_file": stack["metrics"].scrape_key_file,
                             "alerts": ALERTS.model_copy(update={"ttft_p95_s": 7.5})})
    for step in oc.install(render_all(stack["plan"], tighter), str(live)):
        runner.run(step, timeout=120)
    runner.run(oc.reload_http(prom))
    groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    exprs_loaded = {rule["name"]: rule["query"] for g in groups for rule in g["rules"]}
    assert exprs_loaded["AlbertSlowFirstToken"] == f"{q.TTFT_P95} > 7.5"

    # kill the model server: "model down" fires once its for: window has passed
    stop.set()
    traffic.join(10)
    assert failures == []
    killed_at = time.time()
    stack["replay"].stop(signal.SIGKILL)
    with pytest.raises(Exception):  # noqa: B017 - the gateway answers 5xx now, any client error
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    alert = wait_until("AlbertModelDown to fire", lambda: firing(prom, "AlbertModelDown"), 90)[0]
    assert alert["labels"]["model"] == MODEL and alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == f"model {MODEL}: no replica serves"
    from datetime import datetime

    active_at = datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00")).timestamp()
    assert active_at >= killed_at - 1.0  # it was not pending before the kill
    wait_until("the upstream errors panel to have data",
               lambda: all(query(prom, e) for e in upstream.values()), 60)
