"""The engine reloads a unit whose files alone changed (Prometheus) instead of restarting it: the
deploy points it at the new release's files and reloads, a failure points it back, a rollback
reloads the recorded release's files, and files already in place are a no-op."""

from __future__ import annotations

import json
import threading

import pytest

from pyalbert.commands import release
from pyalbert.engine.context import RunContext
from pyalbert.engine.host import HostDeploy
from pyalbert.engine.host_plans import HostPlan, manifest
from pyalbert.errors import RemoteError
from pyalbert.remote import DryRunner, Result
from pyalbert.runtimes import DockerRuntime
from pyalbert.runtimes.prometheus import prometheus_unit
from tests.unit.test_prometheus_unit import placement_of  # noqa: F401


class HostScript(DryRunner):
    """Records every command; answers the probes of a host where ``old`` runs Prometheus."""

    def __init__(self, unit, files_digest: str, prev_doc: dict, reload_fails: bool = False):
        super().__init__("cpu-1")
        self.unit, self.files, self.prev, self.reload_fails = unit, files_digest, prev_doc, reload_fails

    def run(self, cmd, *, check=True, timeout=None):
        self.commands.append(cmd)
        text = cmd.render()
        out, code = "", 0
        if text == self.unit.probe.render():
            out = f"true {self.unit.config_hash} r1"
        elif text == self.unit.reload.probe.render():
            out = self.files + "\n"
        elif text == release.current("/srv/albert").render():
            out = "releases/r1\n"
        elif text == release.read_manifest("/srv/albert", "r1").render():
            out = json.dumps(self.prev)
        elif "/-/ready" in text:
            out = "200"
        elif text.endswith("/-/reload") and self.reload_fails and "releases/r2/" in text:
            code = 1
        if code and check:
            raise RemoteError(f"refused: {text}")
        return Result(cmd, code, out, "", known=True)

    def ran(self, needle: str) -> list[str]:
        return [c.render() for c in self.commands if needle in c.render()]


def host_of(placement, release_id: str) -> HostPlan:
    """The Prometheus host's plan with Prometheus alone."""
    unit, files, _ = prometheus_unit(placement, DockerRuntime(), release_id,
                                     release.release_dir("/srv/albert", release_id))
    return HostPlan(host=placement.spec.env.host("cpu-1"), env="test", base_dir="/srv/albert",
                    release_id=release_id, checks=(), files=tuple(files), units=(unit,),
                    ready_timeout_s=5, keep_releases=5, runtime=DockerRuntime())


def prometheus_of(hp: HostPlan):
    return hp.units[0]


def deploy(hp, runner) -> HostDeploy:
    said: list[str] = []
    session = HostDeploy(runner, hp, lambda host, text, style="": said.append(text),
                         threading.Event(), RunContext(who="me", poll_s=0.01))
    session.said = said
    return session


@pytest.fixture
def r1_r2(placement_of):  # noqa: F811
    old = host_of(placement_of(), "r1")
    new = host_of(placement_of("[metrics.alerts]\nttft_p95_s = 9.0\n"), "r2")
    prev_doc = manifest(old, {}, who="me", when="now", previous=None)
    return old, new, prev_doc


def test_changed_files_are_reloaded_in_place_not_restarted(r1_r2):
    old, new, prev_doc = r1_r2
    unit = prometheus_of(new)
    runner = HostScript(unit, prometheus_of(old).reload.digest, prev_doc)
    session = deploy(new, runner)
    result = session.deploy()
    assert result.status == "deployed" and result.changed == ["albert-test-prometheus"]
    assert runner.ran("docker run") == [] and runner.ran("docker stop") == []
    assert runner.ran("/-/reload") == [unit.reload.apply.render()]
    assert "releases/r2/prometheus" in unit.reload.apply.render()
    assert any("reloading albert-test-prometheus in place" in s for s in session.said)
    doc = json.loads(next(c.stdin_text for c in runner.commands if "manifest.json" in c.render()
                          and c.stdin_text))
    entry = next(u for u in doc["units"] if u["service"] == "prometheus")
    assert entry["release"] == "r2" and entry["reload"]["digest"] == unit.reload.digest


def test_files_already_in_place_change_nothing(r1_r2):
    old, new, prev_doc = r1_r2
    runner = HostScript(prometheus_of(new), prometheus_of(new).reload.digest, prev_doc)
    result = deploy(new, runner).deploy()
    assert result.status == "unchanged" and runner.ran("/-/reload") == []


def test_a_refused_reload_points_prometheus_back_at_the_previous_files(r1_r2):
    old, new, prev_doc = r1_r2
    runner = HostScript(prometheus_of(new), prometheus_of(old).reload.digest, prev_doc,
                        reload_fails=True)
    result = deploy(new, runner).deploy()
    assert result.status != "deployed"
    reloads = runner.ran("/-/reload")
    assert reloads == [prometheus_of(new).reload.apply.render(), prometheus_of(old).reload.apply.render()]
    assert "releases/r1/prometheus" in reloads[-1]
    assert not runner.ran("ln -sfn releases/r2")  # `current` still names r1


def test_rollback_reloads_the_recorded_files_without_a_restart(r1_r2):
    old, new, _ = r1_r2
    runner = HostScript(prometheus_of(old), prometheus_of(new).reload.digest, {})
    result = deploy(old, runner).rollback()
    assert result.status == "rolled back to"
    assert runner.ran("/-/reload") == [prometheus_of(old).reload.apply.render()]
    assert runner.ran("docker run") == []

