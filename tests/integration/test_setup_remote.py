"""``fab setup`` on a namespace host: tools venv from this repo's wheel (no index on the host),
config upload, download_models from a local hub with a gated repo (HF_TOKEN on stdin), whitelist.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.hubserver import HubServer, _QuietServer, tiny_llama_files

REPO = Path(__file__).resolve().parents[2]
FAB = str(REPO / ".venv" / "bin" / "fab")
MODEL = "albert-test/tiny-setup"


class HostHub(HubServer):
    """The test hub, listening where a namespace host reaches this machine."""

    def __init__(self, address: str):
        super().__init__()
        self.address = address

    def start(self) -> HostHub:
        from tests.support.hubserver import _HubHandler

        hub = self

        class Handler(_HubHandler):
            server_hub = hub

        self._server = _QuietServer((self.address, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self


def fab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FAB, "-r", str(REPO / "deploy"), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.fixture(scope="session")
def tools_wheel(tmp_path_factory) -> Path:
    """One wheel for the session: the shared checkout changes while tests run."""
    from pyalbert.engine.setup import build_wheel

    wheel, _ = build_wheel()
    kept = tmp_path_factory.mktemp("wheel") / wheel.name
    kept.write_bytes(wheel.read_bytes())
    return kept


@pytest.fixture
def setup_env(make_host, host_environment, monkeypatch, tools_wheel):
    monkeypatch.setenv("ALBERT_TOOLS_WHEEL", str(tools_wheel))
    host = make_host(docker=False)
    token = "hf_" + secrets.token_hex(12)
    hub = HostHub(host.gateway).start()
    hub.add_commit(MODEL, tiny_llama_files(layers=2))
    hub.gate(MODEL, {token})
    config = host_environment(
        [host], extra='storage_dir = "/home/gitlab/models"',
        routing={"tiny": {"model": MODEL, "port": 8001, "max_model_len": 2048}})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield host, config, hub, token
    finally:
        hub.stop()
        make_host.release(host)


def test_setup_installs_tools_downloads_models_and_builds_the_whitelist(setup_env):
    host, config, hub, token = setup_env
    first = fab("setup", "--env", "test", "--config-dir", str(config))
    out = first.stdout + first.stderr
    assert first.returncode == 0, out
    assert token not in out
    assert f"[{host.name}]" in first.stdout and "tools venv installed" in first.stdout
    assert "config uploaded" in first.stdout
    # the model landed in the storage dir, fetched with the token from the host
    files = host.run(["ls", "/home/gitlab/models/tiny"]).stdout.split()
    assert "config.json" in files and "model.safetensors" in files
    assert any(r.token == token for r in hub.downloads())
    # the whitelist exists where the api reads it, and the host's tools are the repo's
    whitelist = host.run(["cat", "/home/gitlab/albert/shared/whitelist.json"]).stdout
    assert json.loads(whitelist) is not None
    version = host.run(["/home/gitlab/albert/tools/bin/albert", "--version"]).stdout
    assert version.startswith("albert ")
    # nothing runs as root, the token is not in any file the tools wrote
    owner = host.run(["stat", "-c", "%U", "/home/gitlab/albert/tools/bin/python"]).stdout.strip()
    assert owner == "gitlab"
    leaked = host.run(["grep", "-rl", token, "/home/gitlab/albert/config"], check=False)
    assert leaked.stdout == ""

    # second run: tools and config unchanged, the model checked without a new download
    hub.reset_requests()
    second = fab("setup", "--env", "test", "--config-dir", str(config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "tools and config unchanged" in second.stdout
    assert hub.downloads() == []

    # a config change uploads the config only
    routing = config / "llm_routing_table.json"
    table = json.loads(routing.read_text())
    table["tiny"]["max_model_len"] = 1024
    routing.write_text(json.dumps(table))
    third = fab("setup", "--env", "test", "--config-dir", str(config), "--service", "api")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "config uploaded" in third.stdout and "tools venv" not in third.stdout
    assert "ran create_whitelist" in third.stdout and "download_models" not in third.stdout


def test_dry_run_shows_the_plan_with_the_token_masked(setup_env):
    host, config, hub, token = setup_env
    out = fab("setup", "--env", "test", "--config-dir", str(config), "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert token not in out.stdout + out.stderr
    assert "would run: sh -c ***" in out.stdout or "<<< [secret" in out.stdout
    assert "tools venv would be installed" in out.stdout
    assert host.run(["test", "-e", "/home/gitlab/albert/tools"], check=False).returncode == 1
    assert hub.downloads() == []


def test_wrong_token_fails_naming_the_host(setup_env, monkeypatch):
    host, config, hub, token = setup_env
    out = fab("setup", "--env", "test", "--config-dir", str(config), "--service", "vllm",
              env={"HF_TOKEN": "hf_wrong"})
    assert out.returncode != 0
    assert f"✗ {host.name} setup failed" in out.stdout
    assert "hf_wrong" not in out.stdout + out.stderr
