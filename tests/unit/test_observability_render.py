"""Prometheus config, rule file and rule tests rendered from a plan, checked by the real promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pyalbert.commands.gpu import Lease
from pyalbert.config import load_spec
from pyalbert.errors import ConfigError, RemoteError
from pyalbert.observability import MetricsSpec, prometheus_host, render_all
from pyalbert.observability import commands as oc
from pyalbert.observability import exposition as ex
from pyalbert.observability import promql as q
from pyalbert.observability import rules as r
from pyalbert.observability.render import CONFIG_FILE, RULE_TESTS_FILE
from pyalbert.observability.spec import AlertsSpec
from pyalbert.remote import LocalRunner

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: ./scripts/bootstrap installs Debian's prometheus")

TWO_HOSTS = """
    [[hosts]]
    name = "gpu-1"
    address = "10.0.0.1"
    gpus = 1
    [[hosts]]
    name = "gpu-2"
    address = "10.0.0.2"
    gpus = 1
    services = ["vllm"]
    [api]
    port = 8080
"""


@pytest.fixture
def plan(config_factory):
    config_factory.env(TWO_HOSTS)
    config_factory.routing({
        "small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4, "replicas": 2},
        "other": {"model": "org/other", "port": 8002, "gpu_mem_use": 0.4},
    })
    return load_spec("test", config_factory.root).placement


def write(files: dict[str, str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_vllm_server_and_gateway_is_a_target_with_model_host_replica(plan):
    doc = yaml.safe_load(render_all(plan, MetricsSpec())[CONFIG_FILE])
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    small = [c for c in jobs["vllm"]["static_configs"] if c["labels"]["model"] == "small"]
    assert small == [
        {"targets": ["127.0.0.1:8001"], "labels": {"model": "small", "host": "gpu-1", "replica": "0",
                                                  "unit": "albert-test-vllm-small"}},
        # the spare slot: where a replace without downtime moves the replica
        {"targets": ["127.0.0.1:28001"], "labels": {"model": "small", "host": "gpu-1", "replica": "0",
                                                   "unit": "albert-test-vllm-small-spare"}},
        {"targets": ["10.0.0.2:8001"], "labels": {"model": "small", "host": "gpu-2", "replica": "1",
                                                  "unit": "albert-test-vllm-small-1"}},
        {"targets": ["10.0.0.2:28001"], "labels": {"model": "small", "host": "gpu-2", "replica": "1",
                                                  "unit": "albert-test-vllm-small-1-spare"}},
    ]
    assert jobs["api"]["static_configs"] == [
        {"targets": ["10.0.0.1:8080"], "labels": {"host": "gpu-1", "unit": "albert-test-api"}}]
    assert jobs["vllm"]["metrics_path"] == jobs["api"]["metrics_path"] == "/metrics"
    assert doc["global"]["external_labels"] == {"env": "test"}
    assert doc["rule_files"] == [r.RULES_FILE]
    assert "alerting" not in doc and "node" not in jobs
    assert "authorization" not in jobs["api"]  # no scrape key file: scraped without one


def test_vllm_targets_follow_the_placement(plan):
    labels = [(c["targets"][0], c["labels"]["model"], c["labels"]["replica"])
              for c in yaml.safe_load(render_all(plan, MetricsSpec())[CONFIG_FILE])["scrape_configs"][0]["static_configs"]]
    assert labels == [(f"{s.address}:{s.port}", s.model_id, str(s.replica))
                      for i in plan.vllm for s in (i, i.spare_slot())]
    assert len(labels) == 6  # 3 servers, each on its port and its spare port


def test_scrape_key_is_a_file_reference_alertmanager_and_node_exporters(plan):
    metrics = MetricsSpec(scrape_key_file="/etc/prometheus/albert-scrape-key", node_exporter_port=9100,
                          alertmanager={"address": "10.0.0.9:9093", "webhook_url": "https://chat.example/hook"},
                          scrape_interval="30s")
    files = render_all(plan, metrics)
    doc = yaml.safe_load(files[CONFIG_FILE])
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["api"]["authorization"] == {"type": "Bearer",
                                            "credentials_file": "/etc/prometheus/albert-scrape-key"}
    assert "credentials:" not in files[CONFIG_FILE]
    assert [c["targets"] for c in jobs["node"]["static_configs"]] == [["10.0.0.1:9100"], ["10.0.0.2:9100"]]
    assert doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["10.0.0.9:9093"]
    assert doc["global"]["scrape_interval"] == "30s"
    am = yaml.safe_load(files["alertmanager.yml"])
    assert am["route"]["receiver"] == "webhook"
    assert am["receivers"] == [{"name": "webhook", "webhook_configs": [
        {"url": "https://chat.example/hook", "send_resolved": True}]}]


def test_prometheus_host_defaults_to_the_api_host_and_unknown_host_is_named(plan):
    assert prometheus_host(plan, MetricsSpec()).name == "gpu-1"
    assert prometheus_host(plan, MetricsSpec(host="gpu-2")).name == "gpu-2"
    with pytest.raises(ConfigError, match=r"metrics.host.*'gpu-9' is not in 'hosts'.*gpu-1, gpu-2"):
        prometheus_host(plan, MetricsSpec(host="gpu-9"))


@pytest.mark.parametrize("field,value", [
    ("retention", "15 days"), ("scrape_interval", "10"), ("retention_size", "20G"), ("port", 80),
], ids=["retention-words", "interval-no-unit", "size-bad-unit", "port-privileged"])
def test_metrics_spec_refuses_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        MetricsSpec(**{field: value})


def test_metrics_spec_refuses_unknown_keys_and_bad_webhook():
    with pytest.raises(ValidationError, match="retension"):
        MetricsSpec(retension="15d")
    with pytest.raises(ValidationError, match="http"):
        MetricsSpec(alertmanager={"webhook_url": "chat.example/hook"})
    with pytest.raises(ValidationError, match="kv_cache_usage"):
        AlertsSpec(kv_cache_usage=1.0)  # a cache is never more than full: the alert could not fire
    with pytest.raises(ValidationError, match="error_ratio"):
        AlertsSpec(error_ratio=1.0)


def test_every_issue_alert_is_there():
    names = {a.name for a in r.alerts(AlertsSpec())}
    assert names == {"AlbertModelDown", "AlbertReplicaDown", "AlbertApiDown", "AlbertHighErrorRatio",
                     "AlbertSlowFirstToken", "AlbertKvCacheFull", "AlbertRequestsPiling",
                     "AlbertGpuLeaseOverdue", "AlbertKeyRateLimited"}


def test_thresholds_come_from_the_settings():
    a = AlertsSpec(ttft_p95_s=2.5, kv_cache_usage=0.8, error_ratio=0.1, model_down_for="30s",
                   rate_window="2m")
    by = {x.name: x for x in r.alerts(a)}
    assert by["AlbertSlowFirstToken"].expr == f"{q.TTFT_P95} > 2.5"
    assert by["AlbertKvCacheFull"].expr == "vllm:kv_cache_usage_perc > 0.8"
    assert by["AlbertHighErrorRatio"].expr == f"{q.API_5XX_RATIO} > 0.1"
    assert by["AlbertModelDown"].for_ == "30s"
    recorded = {x["record"]: x["expr"] for x in r.recording(a)}
    assert recorded[q.TTFT_P95] == ("histogram_quantile(0.95, sum by (model, le) "
                                   "(rate(vllm:time_to_first_token_seconds_bucket[2m])))")


def test_annotations_render_like_prometheus():
    assert r.expand("model {{ $labels.model }} on {{ $labels.host }}", {"model": "m", "host": "h"}) == \
        "model m on h"
    with pytest.raises(ValueError, match=r"\$value"):
        r.expand("{{ $value }}", {})


@needs_promtool
@pytest.mark.parametrize("alerts", [
    AlertsSpec(),
    AlertsSpec(ttft_p95_s=1.5, kv_cache_usage=0.8, error_ratio=0.2, model_down_for="5m",
               waiting_requests=0, gpu_lease_grace="30m", rejections_per_s=2, rate_window="2m"),
    AlertsSpec(model_down_for="5s", rate_window="30s"),  # the live test's: a step under a minute
    AlertsSpec(model_down_for="0s", gpu_lease_grace="0s", rate_window="8s", waiting_for="8s",
               error_ratio=0.99, kv_cache_usage=0.99),
], ids=["defaults", "custom-thresholds", "short-windows", "zero-and-edges"])
def test_promtool_accepts_config_and_rules_and_the_rule_tests_pass(plan, tmp_path, alerts):
    files = render_all(plan, MetricsSpec(scrape_key_file=str(tmp_path / "key"), alerts=alerts))
    (tmp_path / "key").write_text("k\n")
    folder = write(files, tmp_path / "prom")
    for args in (("check", "config", CONFIG_FILE), ("check", "rules", r.RULES_FILE),
                 ("test", "rules", RULE_TESTS_FILE)):
        done = promtool(*args, cwd=folder)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
@pytest.mark.parametrize("mutation", [
    ("vllm:kv_cache_usage_perc > 0.9", "vllm:kv_cache_usage_perc > 0.99"),  # threshold drifted
    ("(up{job=\"vllm\"}) == 0", "(up{job=\"vllm\"}) == 2"),  # replica down never matches
    ("for: 2m", "for: 20m"),  # model down waits too long
    ("sum by (key) (rate(albert_rejections_total", "sum by (model) (rate(albert_rejections_total"),
], ids=["kv-threshold", "replica-down-expr", "model-down-for", "rejections-label"])
def test_rule_tests_catch_a_broken_rule(plan, tmp_path, mutation):
    files = render_all(plan, MetricsSpec())
    old, new = mutation
    assert old in files[r.RULES_FILE]
    files[r.RULES_FILE] = files[r.RULES_FILE].replace(old, new)
    done = promtool("test", "rules", RULE_TESTS_FILE, cwd=write(files, tmp_path))
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr


@needs_promtool
def test_install_refuses_a_bad_rule_file_before_touching_the_live_folder(plan, tmp_path):
    live = tmp_path / "etc-prometheus"
    runner = LocalRunner()
    good = render_all(plan, MetricsSpec())
    for step in oc.install(good, str(live)):
        runner.run(step)
    before = {p.name: p.read_text() for p in live.iterdir()}
    assert set(before) == set(good)
    assert not (tmp_path / "etc-prometheus.new").exists()

    bad = dict(good)
    bad[r.RULES_FILE] = bad[r.RULES_FILE].replace("> 0.9", "> > 0.9")
    bad[CONFIG_FILE] = bad[CONFIG_FILE].replace("scrape_interval: 15s", "scrape_interval: 5s")
    steps = oc.install(bad, str(live))
    with pytest.raises(RemoteError, match="promtool check config"):
        for step in steps:
            runner.run(step)
    assert {p.name: p.read_text() for p in live.iterdir()} == before


def test_install_checks_every_file_before_the_one_step_that_moves_them():
    steps = oc.install({"prometheus.yml": "a", "albert-rules.yml": "b", "albert-rules.test.yml": "c"},
                       "/etc/albert/prometheus")
    shown = [s.display() for s in steps]
    assert shown[:2] == ["rm -rf /etc/albert/prometheus.new", "mkdir -p /etc/albert/prometheus.new"]
    writes = [(step.stdin_text, step.display().split(" && mv -f ")[-1]) for step in steps[2:5]]
    assert writes == [  # content on stdin, written in the staging folder only
        ("c", "/etc/albert/prometheus.new/albert-rules.test.yml.tmp /etc/albert/prometheus.new/albert-rules.test.yml' <<< [1 bytes]"),
        ("b", "/etc/albert/prometheus.new/albert-rules.yml.tmp /etc/albert/prometheus.new/albert-rules.yml' <<< [1 bytes]"),
        ("a", "/etc/albert/prometheus.new/prometheus.yml.tmp /etc/albert/prometheus.new/prometheus.yml' <<< [1 bytes]"),
    ]
    assert shown[5:8] == [
        "promtool check config /etc/albert/prometheus.new/prometheus.yml",
        "promtool check rules /etc/albert/prometheus.new/albert-rules.yml",
        "promtool test rules /etc/albert/prometheus.new/albert-rules.test.yml",
    ]
    assert shown[8] == (
        "mkdir -p /etc/albert/prometheus && "
        "mv -f /etc/albert/prometheus.new/albert-rules.test.yml /etc/albert/prometheus/albert-rules.test.yml && "
        "mv -f /etc/albert/prometheus.new/albert-rules.yml /etc/albert/prometheus/albert-rules.yml && "
        "mv -f /etc/albert/prometheus.new/prometheus.yml /etc/albert/prometheus/prometheus.yml && "
        "rmdir /etc/albert/prometheus.new")
    assert len(steps) == 9


def test_serve_and_reload_commands():
    m = MetricsSpec(retention="30d", retention_size="20GB", port=9091)
    assert oc.serve(m, "/etc/p/prometheus.yml", "/var/lib/p").display() == (
        "prometheus --config.file=/etc/p/prometheus.yml --storage.tsdb.path=/var/lib/p "
        "--storage.tsdb.retention.time=30d --storage.tsdb.retention.size=20GB "
        "--web.listen-address=0.0.0.0:9091 --web.enable-lifecycle")
    assert "retention.size" not in oc.serve(MetricsSpec(), "c", "d").display()
    assert oc.reload_http("http://10.0.0.1:9090/").display() == \
        "curl -fsS -X POST http://10.0.0.1:9090/-/reload"
    assert oc.reload_signal("/run/albert/prometheus.pid").display() == \
        "pkill -HUP -F /run/albert/prometheus.pid"
    assert oc.check_rules("a.yml", "b.yml").display() == "promtool check rules a.yml b.yml"


def test_gpu_lease_textfile_is_valid_exposition_with_the_expiry():
    lease = Lease(env="staging", who='ci "bot"', pipeline="4242", expires="2026-12-01T20:00:00+00:00")
    samples = ex.parse(oc.lease_textfile(lease))
    assert [(s.name, dict(s.labels), s.value) for s in samples] == [
        (q.GPU_LEASE_EXPIRY, {"env": "staging", "pipeline": "4242", "who": 'ci "bot"'}, 1796155200.0)]
    cmd = oc.write_lease_textfile("/var/lib/node-exporter", lease)
    assert "/var/lib/node-exporter/albert-gpu-lease.prom" in cmd.display()
    assert cmd.stdin_text == oc.lease_textfile(lease)
    assert oc.remove_lease_textfile("/var/lib/node-exporter").display() == \
        "rm -f /var/lib/node-exporter/albert-gpu-lease.prom"


@needs_promtool
def test_rule_tests_hold_for_any_settings(tmp_path):
    """Seeded sweep over thresholds and windows: the generated rule tests pass for each."""
    import random

    rng = random.Random(18)
    durations = ["0s", "1s", "5s", "15s", "30s", "1m", "2m", "5m"]
    for i in range(12):
        a = AlertsSpec(
            model_down_for=rng.choice(durations), error_ratio=rng.choice([0.01, 0.05, 0.3, 0.9]),
            error_ratio_for=rng.choice(durations), ttft_p95_s=rng.choice([0.2, 1, 5, 30]),
            ttft_for=rng.choice(durations), kv_cache_usage=rng.choice([0.5, 0.9, 0.95]),
            kv_cache_for=rng.choice(durations), waiting_requests=rng.choice([0, 5, 100]),
            waiting_for=rng.choice(durations), gpu_lease_grace=rng.choice(durations),
            rejections_per_s=rng.choice([0.01, 0.5, 10]), rejections_for=rng.choice(durations),
            rate_window=rng.choice(["8s", "30s", "1m", "5m", "10m"]))
        folder = write({r.RULES_FILE: r.dump(r.rules(a)), RULE_TESTS_FILE: r.dump(r.rule_tests(a))},
                       tmp_path / str(i))
        done = promtool("test", "rules", RULE_TESTS_FILE, cwd=folder)
        assert done.returncode == 0, f"{a}\n{done.stdout}{done.stderr}"
