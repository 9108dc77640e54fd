"""fab deploy on real namespace hosts (sshd + dockerd each) with the fake vLLM image.

One module-scoped host with the image loaded; each test deploys its own environment name so the
containers, ports and releases of one test never meet another's, and ``down`` cleans up.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.config import load_spec
from pyalbert.engine.operations import (
    deploy_env,
    down_env,
    list_releases,
    lock_env,
    rollback_env,
    unlock_env,
)
from pyalbert.errors import AlbertError
from tests.support.hosts import environment_toml, ssh_environ
from tests.support.traffic import chat_load

REPO = Path(__file__).resolve().parents[2]
STORAGE = Path("/var/tmp/albert-deploy-tests/models")


@pytest.fixture(scope="module")
def host(fake_vllm_host):
    return fake_vllm_host


class Env:
    """One test environment on the shared host: write config, deploy, look, clean up."""

    def __init__(self, host, image, root: Path, monkeypatch, name: str):
        self.host, self.image, self.root, self.name = host, image, root, name
        (root / "environments").mkdir(parents=True, exist_ok=True)
        for key, value in ssh_environ([host], root).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("ALBERT_READY_POLL_S", "0.2")

    def write(self, models: dict, *, api_port: int, timeout: float = 20, extra: str = "") -> None:
        for model_id in models:
            (STORAGE / model_id).mkdir(parents=True, exist_ok=True)
        (self.root / "llm_routing_table.json").write_text(json.dumps(models))
        text = environment_toml([self.host], f"""
storage_dir = "{STORAGE}"
[images]
vllm = "{self.image}"
api = "{self.image}"
[api]
port = {api_port}
[deploy]
ready_timeout_s = {timeout}
keep_releases = 3
base_dir = "/home/gitlab/albert-{self.name}"
{extra}""")
        (self.root / "environments" / f"{self.name}.toml").write_text(text)

    def spec(self):
        return load_spec(self.name, self.root)

    def get(self, port: int, path: str) -> httpx.Response:
        return httpx.get(f"http://{self.host.address}:{port}{path}", timeout=5)

    def containers(self) -> dict[str, str]:
        out = self.host.run(["docker", "ps", "--filter", f"label=albert.env={self.name}",
                             "--format", '{{.Names}} {{.Label "albert.config-hash"}}']).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


@pytest.fixture
def env(host, tmp_path, monkeypatch, request):
    h, image = host
    name = "d" + request.node.name.replace("test_", "").replace("_", "")[:20].lower()
    e = Env(h, image, tmp_path / "config", monkeypatch, name)
    yield e
    with contextlib.suppress(Exception):  # the host is torn down at the end anyway
        down_env(e.spec())


def chat(e: Env, port: int, model: str) -> str:
    r = httpx.post(f"http://{e.host.address}:{port}/v1/chat/completions", timeout=10,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_deploy_then_noop_then_change_then_rollback(env):
    env.write({"m-a": {"model": "org/a", "port": 18101},
               "m-b": {"model": "org/b", "port": 18102, "env": {"FAKE_VLLM_START_DELAY": "1"}}},
              api_port=18180)
    results = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in results] == ["deployed"]
    assert chat(env, 18101, "m-a") == "echo: hi"
    assert [m["id"] for m in env.get(18102, "/v1/models").json()["data"]] == ["m-b"]
    assert set(env.get(18180, "/v1/models").json()["data"][0].values()) >= {"m-a"}
    first = env.containers()
    assert set(first) == {f"albert-{env.name}-vllm-m-a", f"albert-{env.name}-vllm-m-b",
                          f"albert-{env.name}-api", f"albert-{env.name}-api-blue"}
    env_file = env.host.run(f"stat -c %a /home/gitlab/albert-{env.name}/releases/*/"
                            f"albert-{env.name}-vllm-m-a.env").stdout.strip()
    assert env_file == "600"

    t0 = time.monotonic()
    again = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in again] == ["unchanged"] and time.monotonic() - t0 < 5
    assert env.containers() == first

    env.write({"m-a": {"model": "org/a", "port": 18101, "env": {"X": "2"}},
               "m-b": {"model": "org/b", "port": 18102, "env": {"FAKE_VLLM_START_DELAY": "1"}}},
              api_port=18180)
    changed = deploy_env(env.spec(), quiet=True)[0]
    # m-a's env changed; the api's config folder holds the routing table, so it moves too (lossless)
    assert changed.changed == [f"albert-{env.name}-vllm-m-a", f"albert-{env.name}-api"]
    now = env.containers()
    assert now[f"albert-{env.name}-vllm-m-b"] == first[f"albert-{env.name}-vllm-m-b"]
    assert now[f"albert-{env.name}-vllm-m-a"] != first[f"albert-{env.name}-vllm-m-a"]

    (current, items), = list_releases(env.spec()).values()
    assert len(items) == 2 and current == items[-1]["id"]
    back = rollback_env(env.spec(), quiet=True)
    assert back[0].status == "rolled back to" and back[0].release == items[0]["id"]
    now = env.containers()
    assert now[f"albert-{env.name}-vllm-m-a"] == first[f"albert-{env.name}-vllm-m-a"]
    assert chat(env, 18101, "m-a") == "echo: hi"


def test_readiness_timeout_rolls_back_and_previous_release_serves(env):
    env.write({"m-a": {"model": "org/a", "port": 18111}}, api_port=18190, timeout=3)
    deploy_env(env.spec(), service="vllm", quiet=True)
    before = env.containers()
    env.write({"m-a": {"model": "org/a", "port": 18111, "env": {"FAKE_VLLM_FAIL": "never-ready"}}},
              api_port=18190, timeout=3)
    with pytest.raises(AlbertError, match="failed on 1 of 1 host"):
        deploy_env(env.spec(), service="vllm", quiet=True)
    assert env.containers() == before
    assert env.get(18111, "/health").status_code == 200
    assert env.host.run(f"test -e /home/gitlab/albert-{env.name}/deploy.lock", check=False).returncode


def test_crashing_server_fails_fast_with_its_log_lines(env, capsys):
    env.write({"m-a": {"model": "org/a", "port": 18121, "env": {"FAKE_VLLM_FAIL": "exit"}}},
              api_port=18191, timeout=60)
    t0 = time.monotonic()
    with pytest.raises(AlbertError):
        deploy_env(env.spec(), service="vllm")
    assert time.monotonic() - t0 < 30
    assert "failed to load the model" in capsys.readouterr().out


def test_lock_held_fails_at_once_naming_the_holder(env):
    env.write({"m-a": {"model": "org/a", "port": 18131}}, api_port=18192)
    lock_env(env.spec(), message="db migration")
    try:
        with pytest.raises(AlbertError, match="db migration"):
            deploy_env(env.spec(), quiet=True)
        assert env.containers() == {}
    finally:
        unlock_env(env.spec())
    assert [r.status for r in deploy_env(env.spec(), service="vllm", quiet=True)] == ["deployed"]


def test_port_taken_by_another_process(env):
    env.write({"m-a": {"model": "org/a", "port": 18141}}, api_port=18193)
    squatter = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{env.host.netns}", sys.executable, "-m", "http.server",
         "18141", "--bind", env.host.address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        with pytest.raises(AlbertError, match="port 18141 is already taken by another process"):
            deploy_env(env.spec(), service="vllm", quiet=True)
    finally:
        squatter.terminate()
        squatter.wait(10)


def test_missing_model_and_low_disk(env, monkeypatch):
    env.write({"m-a": {"model": "org/a", "port": 18151}}, api_port=18194)
    (STORAGE / "m-gone").mkdir(parents=True, exist_ok=True)
    (STORAGE / "m-gone").rmdir()
    env.write({"m-a": {"model": "org/a", "port": 18151}}, api_port=18194)
    monkeypatch.setenv("ALBERT_MIN_FREE_MIB", str(10**9))
    with pytest.raises(AlbertError, match="not enough disk"):
        deploy_env(env.spec(), service="vllm", quiet=True)
    monkeypatch.setenv("ALBERT_MIN_FREE_MIB", "1")
    spec = env.spec()
    (STORAGE / "m-a").rmdir()
    with pytest.raises(AlbertError, match="fab setup"):
        deploy_env(spec, service="vllm", quiet=True)


def test_ssh_faults_are_one_paragraph(env, monkeypatch, tmp_path):
    env.write({"m-a": {"model": "org/a", "port": 18161}}, api_port=18195)
    monkeypatch.setenv("SSH_KNOWN_HOSTS", str(tmp_path / "empty_known_hosts"))
    (tmp_path / "empty_known_hosts").write_text("")
    with pytest.raises(AlbertError, match="not in known_hosts"):
        deploy_env(env.spec(), quiet=True)


def test_docker_missing_says_run_provision(env):
    env.write({"m-a": {"model": "org/a", "port": 18171}}, api_port=18196)
    text = (env.root / "environments" / f"{env.name}.toml").read_text()
    # a host user outside the docker group cannot talk to dockerd: same symptom as no docker
    (env.root / "environments" / f"{env.name}.toml").write_text(text.replace('user = "gitlab"',
                                                                              'user = "nobody"'))
    with pytest.raises(AlbertError):
        deploy_env(env.spec(), quiet=True)


def test_api_redeploy_loses_no_request(env):
    env.write({"m-a": {"model": "org/a", "port": 18201}}, api_port=18280)
    deploy_env(env.spec(), quiet=True)
    with chat_load(f"http://{env.host.address}:18280", "m-a", clients=4) as load:
        for version in ("2", "3"):
            env.write({"m-a": {"model": "org/a", "port": 18201}}, api_port=18280,
                      extra=f'[vllm]\nenv = {{FAKE_API_VERSION = "{version}"}}')
            res = deploy_env(env.spec(), service="api", quiet=True)
            assert res[0].status == "deployed"
    assert load.ok > 20 and load.errors == []
