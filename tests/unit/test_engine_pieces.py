"""The engine's small parts: the one fan-out, the entry points' error wrapper, the run context,
SSH material passed in, the deployment resolved once."""

from __future__ import annotations

import threading

import pytest

from pyalbert.config import Deployment, load_spec, resolved
from pyalbert.config.environment import HostSpec, SshSpec
from pyalbert.engine.context import RunContext
from pyalbert.engine.fanout import fan_out, values
from pyalbert.entry import exit_code
from pyalbert.errors import AlbertError, ConfigError
from pyalbert.remote import SshMaterial


class FakeRunner:
    def __init__(self, host):
        self.label, self.closed = host.name, False

    def close(self):
        self.closed = True


def hosts(*names):
    return [HostSpec(name=n, address=f"10.0.0.{i + 1}") for i, n in enumerate(names)]


def test_fan_out_gives_one_outcome_per_host_in_order_and_closes_every_runner():
    made: list[FakeRunner] = []

    def factory(host):
        made.append(FakeRunner(host))
        return made[-1]

    def work(runner, host, cancel):
        assert isinstance(cancel, threading.Event) and not cancel.is_set()
        if host.name == "b":
            raise AlbertError("host b: refused")
        return f"{runner.label} done"

    outcomes = fan_out(hosts("a", "b", "c"), work, factory)
    assert [(o.host, o.value) for o in outcomes] == [("a", "a done"), ("b", None), ("c", "c done")]
    assert str(outcomes[1].error) == "host b: refused"
    assert len(made) == 3 and all(r.closed for r in made)
    assert isinstance(values(outcomes)["b"], AlbertError)


def test_values_raise_a_bug_instead_of_reporting_it():
    outcomes = fan_out(hosts("a"), lambda r, h, c: 1 / 0, FakeRunner)
    with pytest.raises(ZeroDivisionError):
        values(outcomes)


def test_exit_code_is_the_one_error_wrapper(capsys):
    assert exit_code(lambda: None) == 0
    assert exit_code(lambda: 4) == 4

    def config_error():
        raise ConfigError([])

    assert exit_code(config_error) == 2

    def user_error():
        raise AlbertError("host a is locked by ana. Fix: wait.")

    assert exit_code(user_error) == 1
    assert "error: host a is locked by ana. Fix: wait." in capsys.readouterr().err

    def bug():
        raise KeyError("x")

    with pytest.raises(KeyError):
        exit_code(bug)


def test_run_context_reads_its_environment_when_asked():
    ctx = RunContext.from_environ({"GITLAB_USER_LOGIN": "ana", "CI_PIPELINE_ID": "42",
                                   "ALBERT_READY_POLL_S": "0.2", "ALBERT_MIN_FREE_MIB": "7"})
    assert ctx.who.startswith("ana@") and ctx.pipeline == "42" and ctx.lease_holder == "42"
    assert (ctx.poll_s, ctx.min_free_mib) == (0.2, 7)
    local = RunContext.from_environ({"GITLAB_USER_LOGIN": "bo"})
    assert local.pipeline is None and local.lease_holder == f"local-{local.who}"
    assert (local.poll_s, local.min_free_mib) == (0.5, 1024)


def test_ssh_material_comes_from_the_variables_the_ssh_section_names():
    ssh = SshSpec(key_env="DEPLOY_KEY", known_hosts_env="DEPLOY_KNOWN")
    got = SshMaterial.from_environ(ssh, {"DEPLOY_KEY": "/k", "DEPLOY_KNOWN": "/kh",
                                         "SSH_PRIVATE_KEY": "/other"})
    assert (got.key, got.known_hosts, got.key_source) == ("/k", "/kh", "DEPLOY_KEY")


def test_load_spec_returns_the_deployment_resolved_once(config_factory, monkeypatch):
    config_factory.env('[[hosts]]\nname="h"\naddress="10.0.0.1"\ngpus=1\n')
    config_factory.routing({"m": {"model": "org/m", "port": 8001, "gpu_mem_use": 0.5}})
    dep = load_spec("test", config_factory.root)
    assert isinstance(dep, Deployment) and [i.name for i in dep.placement.vllm] == ["albert-test-vllm-m"]
    import pyalbert.config.deployment as deployment

    monkeypatch.setattr(deployment, "resolve_placement", lambda spec: pytest.fail("resolved again"))
    assert resolved(dep) is dep
