"""The local environment brings its Prometheus up: a scrape key in the keys file (hashed) and on
the host where ``metrics.scrape_key_file`` says (written only when it differs), a deploy of the
whole plan, its URL printed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pyalbert.api.keys import hash_key
from pyalbert.devtools.localenv import LocalEnv
from pyalbert.remote import DryRunner, Result


@pytest.fixture
def local(tmp_path, monkeypatch):
    for name in ("ALBERT_API_KEY", "ALBERT_API_KEYS", "GITLAB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    env = LocalEnv(state=tmp_path)
    made = env.ensure_secrets()
    env.made = made
    return env


def test_the_keys_file_holds_a_hashed_scrape_key(local, tmp_path):
    assert "Prometheus scrape key" in local.made
    scrape = (tmp_path / "secrets" / "prometheus-scrape-key").read_text().strip()
    keys = json.loads((tmp_path / "secrets" / "keys.json").read_text())["keys"]
    assert {"name": "prometheus", "sha256": hash_key(scrape), "models": [], "scrape": True} in keys
    assert scrape not in json.dumps(keys)
    assert local.ensure_secrets() == []  # a second run makes nothing


class Host(DryRunner):
    def __init__(self, holds: str):
        super().__init__("local")
        self.holds = holds

    def run(self, cmd, *, check=True, timeout=None):
        self.commands.append(cmd)
        return Result(cmd, 0, self.holds if cmd.tokens[0] == "cat" else "", "")

    def close(self):
        pass


@pytest.mark.parametrize("holds, written", [("", True), ("same", False)], ids=["new", "unchanged"])
def test_prometheus_phase_writes_the_scrape_key_then_deploys_everything(local, monkeypatch, holds, written):
    key = (local.state / "secrets" / "prometheus-scrape-key").read_text().strip()
    host = Host(key if holds == "same" else holds)
    monkeypatch.setattr(local, "runners", lambda h: lambda spec_host: host)
    deployed = []
    monkeypatch.setattr("pyalbert.engine.operations.deploy_env", lambda spec, **kw: deployed.append(kw)
                        or [SimpleNamespace(ok=True, host="local", status="deployed",
                                            changed=["albert-local-prometheus"])])
    said = local._prometheus(None)
    puts = [c for c in host.commands if c.tokens[0] == "sh"]
    assert bool(puts) is written
    if written:
        assert "/home/gitlab/albert/prometheus-local/scrape-key" in puts[0].render()
        assert key not in puts[0].render() and "0600" in puts[0].render()
    assert [kw["service"] for kw in deployed] == ["all"]
    assert said.endswith("local: deployed (albert-local-prometheus)")
    assert local.prometheus_url() == "http://10.210.0.2:9090"
