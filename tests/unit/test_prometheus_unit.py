"""Prometheus is a unit of the release on the Prometheus host: its files in the release, promtool
in the preflight, the same start/stop/probe/readiness as every unit (both runtimes)."""

from __future__ import annotations

import shutil

import pytest

from pyalbert.config import load_spec
from pyalbert.engine.host_plans import deploy_plans, manifest, units_from_manifest
from pyalbert.remote import LocalRunner
from pyalbert.runtimes import DockerRuntime
from pyalbert.runtimes.base import DeployInputs
from pyalbert.runtimes.checks import HostFacts, PortFree
from pyalbert.runtimes.prometheus import PromtoolAccepts
from pyalbert.runtimes.venv import VenvRuntime

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")

ENV = """
    [deploy]
    base_dir = "/srv/albert"
    [[hosts]]
    name = "gpu-1"
    address = "10.0.0.1"
    gpus = 1
    services = ["vllm"]
    [[hosts]]
    name = "cpu-1"
    address = "10.0.0.2"
    services = ["api"]
    [metrics]
    enabled = true
"""


@pytest.fixture
def placement_of(config_factory):
    def make(extra: str = ""):
        config_factory.env(ENV + extra)
        config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
        return load_spec("test", config_factory.root).placement
    return make


def plans(placement, runtime=None, release_id="r1", **kw):
    runtime = runtime or DockerRuntime()
    return {hp.host.name: hp for hp in deploy_plans(placement, DeployInputs(release_id=release_id, **kw),
                                                    runtime)}


def prometheus_of(hp):
    return next(u for u in hp.units if getattr(u, "service", "") == "prometheus")


def test_docker_unit_runs_the_image_on_the_host_network_as_the_deploy_user(placement_of):
    hp = plans(placement_of())["cpu-1"]
    unit = prometheus_of(hp)
    assert unit.start.render() == (
        "mkdir -p /srv/albert/prometheus-test && "
        "ln -sfn /srv/albert/releases/r1/prometheus /srv/albert/prometheus-test/config.tmp && "
        "mv -Tf /srv/albert/prometheus-test/config.tmp /srv/albert/prometheus-test/config && "
        "mkdir -p /srv/albert/prometheus-test/data && docker run -d --name albert-test-prometheus "
        "--restart unless-stopped --network host "
        "-v /srv/albert/releases:/srv/albert/releases:ro "
        "-v /srv/albert/prometheus-test:/srv/albert/prometheus-test "
        "--label albert.env=test --label albert.service=prometheus --label albert.model= "
        f"--label albert.release=r1 --label albert.config-hash={unit.config_hash} "
        '--user "$(id -u):$(id -g)" prom/prometheus:v2.53.0 '
        "--config.file=/srv/albert/prometheus-test/config/prometheus.yml "
        "--storage.tsdb.path=/srv/albert/prometheus-test/data --storage.tsdb.retention.time=15d "
        "--web.listen-address=0.0.0.0:9090 --web.enable-lifecycle")
    assert unit.ready.display() == "wait until http://127.0.0.1:9090/-/ready is 200"


def test_venv_unit_is_a_supervised_debian_prometheus(placement_of):
    placement = placement_of("retention_size = '2GB'\n")
    unit = prometheus_of(plans(placement, VenvRuntime(placement.spec.env))["cpu-1"])
    assert unit.start.render() == (
        "mkdir -p /srv/albert/prometheus-test && "
        "ln -sfn /srv/albert/releases/r1/prometheus /srv/albert/prometheus-test/config.tmp && "
        "mv -Tf /srv/albert/prometheus-test/config.tmp /srv/albert/prometheus-test/config && "
        "mkdir -p /srv/albert/prometheus-test/data && /srv/albert/tools/bin/albert supervise start "
        "albert-test-prometheus --state-dir /srv/albert/run-test "
        f"--label albert.config-hash={unit.config_hash} --label albert.env=test "
        "--label albert.model= --label albert.release=r1 --label albert.service=prometheus "
        "--stop-timeout 10 -- /usr/bin/prometheus "
        "--config.file=/srv/albert/prometheus-test/config/prometheus.yml "
        "--storage.tsdb.path=/srv/albert/prometheus-test/data --storage.tsdb.retention.time=15d "
        "--storage.tsdb.retention.size=2GB --web.listen-address=0.0.0.0:9090 --web.enable-lifecycle")


def test_only_the_prometheus_host_runs_it_with_files_checks_and_port(placement_of):
    by_host = plans(placement_of())
    assert all(getattr(u, "service", "") != "prometheus" for u in by_host["gpu-1"].units)
    hp = by_host["cpu-1"]
    assert hp.units[-1].name == "albert-test-prometheus"
    assert sorted(f.path for f in hp.files if "/prometheus/" in f.path) == [
        "/srv/albert/releases/r1/prometheus/albert-rules.test.yml",
        "/srv/albert/releases/r1/prometheus/albert-rules.yml",
        "/srv/albert/releases/r1/prometheus/files.sha",
        "/srv/albert/releases/r1/prometheus/prometheus.yml"]
    assert any(isinstance(c, PromtoolAccepts) for c in hp.checks)
    assert PortFree(9090, "albert-test-prometheus") in hp.checks


@pytest.mark.parametrize("extra, kw", [
    ("", {"service": "vllm"}), ("", {"model": "small"}), ("[metrics]\nenabled = false\n", {}),
], ids=["vllm-only", "one-model", "disabled"])
def test_no_prometheus_unit_when(config_factory, extra, kw):
    env = ENV.replace("[metrics]\n    enabled = true\n", "") + extra
    config_factory.env(env)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    placement = load_spec("test", config_factory.root).placement
    for hp in plans(placement, **kw).values():
        assert all(getattr(u, "service", "") != "prometheus" for u in hp.units)


def test_changed_thresholds_are_a_reload_not_a_restart(placement_of):
    first = prometheus_of(plans(placement_of(), release_id="r1")["cpu-1"])
    same = prometheus_of(plans(placement_of(), release_id="r2")["cpu-1"])
    assert (same.config_hash, same.reload.digest) == (first.config_hash, first.reload.digest)
    changed = prometheus_of(plans(placement_of("[metrics.alerts]\nttft_p95_s = 9.0\n"),
                                  release_id="r2")["cpu-1"])
    assert changed.config_hash == first.config_hash  # its command: no restart
    assert changed.reload.digest != first.reload.digest  # its files: a reload
    assert changed.reload.probe.render() == "cat /srv/albert/prometheus-test/config/files.sha"
    assert changed.reload.apply.render() == (
        "mkdir -p /srv/albert/prometheus-test && "
        "ln -sfn /srv/albert/releases/r2/prometheus /srv/albert/prometheus-test/config.tmp && "
        "mv -Tf /srv/albert/prometheus-test/config.tmp /srv/albert/prometheus-test/config && "
        "curl -fsS -X POST http://127.0.0.1:9090/-/reload")
    retained = prometheus_of(plans(placement_of("retention = '30d'\n"), release_id="r2")["cpu-1"])
    assert retained.config_hash != first.config_hash  # its command changed: a restart


def test_the_digest_file_holds_the_digest_the_reload_compares(placement_of):
    hp = plans(placement_of())["cpu-1"]
    sha = next(f for f in hp.files if f.path.endswith("/files.sha"))
    assert sha.content == prometheus_of(hp).reload.digest + "\n"


def test_manifest_keeps_the_readiness_path_for_rollback(placement_of):
    hp = plans(placement_of())["cpu-1"]
    doc = manifest(hp, {}, who="me", when="now", previous=None)
    unit = next(u for u in units_from_manifest(doc) if getattr(u, "service", "") == "prometheus")
    assert unit.ready.path == "/-/ready" and unit.config_hash == prometheus_of(hp).config_hash
    assert unit.reload.digest == prometheus_of(hp).reload.digest
    assert unit.reload.apply.render() == prometheus_of(hp).reload.apply.render()


def facts() -> HostFacts:
    return HostFacts("me", "test", "/srv/albert", lambda: set())


@needs_promtool
def test_promtool_accepts_the_rendered_files(placement_of, tmp_path):
    check = next(c for c in plans(placement_of())["cpu-1"].checks if isinstance(c, PromtoolAccepts))
    check = PromtoolAccepts(check.files, str(tmp_path / "check"))
    assert check.judge(LocalRunner().run(check.cmd, check=False), facts()) is None


@needs_promtool
def test_promtool_refuses_a_zero_rate_window_naming_the_rule_and_fix(placement_of, tmp_path):
    placement = placement_of("[metrics.alerts]\nrate_window = '0s'\n")
    check = next(c for c in plans(placement)["cpu-1"].checks if isinstance(c, PromtoolAccepts))
    check = PromtoolAccepts(check.files, str(tmp_path / "check"))
    problem = check.judge(LocalRunner().run(check.cmd, check=False), facts())
    assert problem is not None and "promtool refused" in problem
    assert "duration must be greater than 0" in problem and "environments/test.toml" in problem
