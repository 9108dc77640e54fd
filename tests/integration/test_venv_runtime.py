"""The venv runtime on a namespace host without Docker: the Docker runtime's deploy scenarios.

One module-scoped host (sshd, no dockerd) with the tools venv that the real setup stage installs
(``setup_env``, once) and a fake vLLM (``tests/support/fake_vllm`` on the path of a stdlib venv,
``vllm.python``). Each test deploys its own environment name and base dir (its ``tools`` is a
link to the shared tools venv), so the processes, ports and releases of one test never meet
another's; ``down_env`` cleans up.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.config import load_spec
from pyalbert.engine.operations import deploy_env, down_env, list_releases, rollback_env, status_env
from pyalbert.engine.setup import setup_env
from pyalbert.errors import AlbertError
from pyalbert.remote import SSHRunner
from pyalbert.runtimes import runtime_for
from tests.support.hosts import environment_toml, ssh_environ
from tests.support.traffic import chat_load

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/albert-test")
FAKE_VENV = CACHE / "fake-vllm-venv"
STORAGE = Path("/var/tmp/albert-venv-tests/models")
TOOLS_BASE = "/home/gitlab/albert-vt-tools"


def fake_vllm_python() -> str:
    """A stdlib venv whose ``python -m vllm.entrypoints.openai.api_server`` is the fake server."""
    python = FAKE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(FAKE_VENV)],
                       check=True, capture_output=True, timeout=60)
    site = next((FAKE_VENV / "lib").glob("python3*/site-packages"))
    (site / "albert_fake_vllm.pth").write_text(f"{REPO / 'tests/support/fake_vllm'}\n")
    for path in (CACHE, FAKE_VENV):
        path.chmod(0o755)
    return str(python)


def write_env(root: Path, host, name: str, *, base: str, python: str, models: dict,
              api_port: int = 18380, timeout: float = 20, vllm_env: dict | None = None,
              extra: str = "") -> None:
    (root / "environments").mkdir(parents=True, exist_ok=True)
    for model_id in models:
        (STORAGE / model_id).mkdir(parents=True, exist_ok=True)
    STORAGE.parent.chmod(0o755)
    (root / "llm_routing_table.json").write_text(json.dumps(models))
    env_line = json.dumps(vllm_env or {}).replace('": ', '" = ')
    (root / "environments" / f"{name}.toml").write_text(environment_toml([host], f"""
runtime = "venv"
storage_dir = "{STORAGE}"
[vllm]
python = "{python}"
env = {env_line}
[api]
port = {api_port}
[deploy]
ready_timeout_s = {timeout}
keep_releases = 3
base_dir = "{base}"
{extra}"""))


@pytest.fixture(scope="module")
def host(make_host, tmp_path_factory):
    """A host without Docker, with the tools venv installed by the real setup stage."""
    python = fake_vllm_python()
    h = make_host(docker=False)
    root = tmp_path_factory.mktemp("venv-tools-config")
    write_env(root, h, "vttools", base=TOOLS_BASE, python=python, models={"m-a": {
        "model": "org/a", "port": 18300}})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ssh_environ([h], root).items():
            mp.setenv(key, value)
        outcomes = setup_env(load_spec("vttools", root), service="api")
    errors = [f"{o.host}: {o.error}" for o in outcomes if o.error]
    assert not errors, errors
    yield h, python


class Env:
    """One test environment on the shared host: write config, deploy, look, clean up."""

    def __init__(self, host, python: str, root: Path, monkeypatch, name: str):
        self.host, self.python, self.root, self.name = host, python, root, name
        self.base = f"/home/gitlab/albert-{name}"
        self.state = f"{self.base}/run-{name}"
        root.mkdir(parents=True, exist_ok=True)
        for key, value in ssh_environ([host], root).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("ALBERT_READY_POLL_S", "0.2")
        # the tools venv `fab setup` installed, shared by every test's base dir
        host.run(f"mkdir -p {self.base} && ln -sfn {TOOLS_BASE}/tools {self.base}/tools && "
                 f"chown -h gitlab: {self.base} {self.base}/tools")

    def write(self, models: dict, **kw) -> None:
        kw.setdefault("python", self.python)
        write_env(self.root, self.host, self.name, base=self.base, models=models, **kw)

    def spec(self):
        return load_spec(self.name, self.root)

    def get(self, port: int, path: str) -> httpx.Response:
        return httpx.get(f"http://{self.host.address}:{port}{path}", timeout=5)

    def supervised(self) -> dict[str, dict]:
        """name -> supervisor state of the processes running now (as the host's files say)."""
        out = self.host.run(f"cat {self.state}/*.json 2>/dev/null || true").stdout
        return {s["name"]: s for s in _json_objects(out) if s.get("state") in ("running", "restarting")}

    def running(self) -> dict[str, str]:
        """name -> config hash, like test_deploy's ``containers()``."""
        return {n: s["labels"]["albert.config-hash"] for n, s in self.supervised().items()}


def _json_objects(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


@pytest.fixture
def env(host, tmp_path, monkeypatch, request):
    h, python = host
    name = "v" + request.node.name.replace("test_", "").replace("_", "")[:20].lower()
    e = Env(h, python, tmp_path / "config", monkeypatch, name)
    yield e
    with contextlib.suppress(Exception):  # the host is torn down at the end anyway
        down_env(e.spec())


def chat(e: Env, port: int, model: str) -> str:
    r = httpx.post(f"http://{e.host.address}:{port}/v1/chat/completions", timeout=10,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            value = predicate()
            if value:
                return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout:g}s")


def test_deploy_noop_change_kill_status_logs_rollback_down(env):
    models = {"m-a": {"model": "org/a", "port": 18301},
              "m-b": {"model": "org/b", "port": 18302, "env": {"FAKE_VLLM_START_DELAY": "1"}}}
    env.write(models, api_port=18380)
    results = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in results] == ["deployed"]
    assert chat(env, 18301, "m-a") == "echo: hi"
    assert {m["id"] for m in env.get(18380, "/v1/models").json()["data"]} == {"m-a", "m-b"}
    assert chat(env, 18380, "m-b") == "echo: hi"  # through the edge and the real albert api
    first = env.running()
    n = env.name
    assert set(first) == {f"albert-{n}-vllm-m-a", f"albert-{n}-vllm-m-b", f"albert-{n}-api",
                          f"albert-{n}-api-blue"}
    mode = env.host.run(f"stat -c %a {env.base}/releases/*/albert-{n}-vllm-m-a.env").stdout.strip()
    assert mode == "600"
    pids = {k: s["pid"] for k, s in env.supervised().items()}

    # no-op: nothing restarts and it says so
    t0 = time.monotonic()
    again = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in again] == ["unchanged"] and time.monotonic() - t0 < 5
    assert {k: s["pid"] for k, s in env.supervised().items()} == pids

    # a config change restarts only that model (and the api, whose config folder holds the table)
    models["m-a"]["env"] = {"X": "2"}
    env.write(models, api_port=18380)
    changed = deploy_env(env.spec(), quiet=True)[0]
    assert changed.changed == [f"albert-{n}-vllm-m-a", f"albert-{n}-api"]
    now = env.supervised()
    assert now[f"albert-{n}-vllm-m-b"]["pid"] == pids[f"albert-{n}-vllm-m-b"]
    assert now[f"albert-{n}-vllm-m-a"]["pid"] != pids[f"albert-{n}-vllm-m-a"]
    assert set(now) == {f"albert-{n}-vllm-m-a", f"albert-{n}-vllm-m-b", f"albert-{n}-api",
                        f"albert-{n}-api-green"}

    # a killed server is restarted by its supervisor and serves again
    victim = now[f"albert-{n}-vllm-m-b"]
    env.host.run(["kill", "-KILL", str(victim["pid"])])
    back = wait_for(lambda: (s := env.supervised().get(f"albert-{n}-vllm-m-b"))
                    and s["pid"] not in (None, victim["pid"]) and s)
    assert back["restarts"] == 1 and back["supervisor_pid"] == victim["supervisor_pid"]
    assert wait_for(lambda: chat(env, 18302, "m-b") == "echo: hi")

    # status and logs show the processes
    rows = status_env(env.spec())[env.host.name]["rows"]
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(now)  # the stopped blue colour is not listed (like a removed container)
    assert by_name[f"albert-{n}-vllm-m-a"]["health"] == "ok"
    assert by_name[f"albert-{n}-api"]["health"] == "ok"
    assert "restarts 1" in by_name[f"albert-{n}-vllm-m-b"]["status"]
    spec = env.spec()
    with contextlib.closing(SSHRunner(spec.env.hosts[0], spec.env.ssh)) as r:
        log = r.run(runtime_for(spec.env).logs(f"albert-{n}-vllm-m-b", 20)).stdout
    assert "fake vllm: model" in log and "exited with -9" in log

    # rollback to the first release: m-a goes back to its first config
    (current, items), = list_releases(spec).values()
    assert len(items) == 2 and current == items[-1]["id"]
    rolled = rollback_env(spec, quiet=True)
    assert rolled[0].status == "rolled back to" and rolled[0].release == items[0]["id"]
    assert env.running()[f"albert-{n}-vllm-m-a"] == first[f"albert-{n}-vllm-m-a"]
    assert chat(env, 18301, "m-a") == "echo: hi"

    # down stops everything; status then lists nothing
    serving = set(env.running())
    assert len(serving) == 4
    assert set(down_env(spec)[env.host.name]) == serving
    assert env.supervised() == {}
    assert status_env(spec)[env.host.name]["rows"] == []
    with pytest.raises(httpx.ConnectError):
        env.get(18301, "/health")


def test_readiness_timeout_rolls_back_and_previous_release_serves(env):
    env.write({"m-a": {"model": "org/a", "port": 18311}}, api_port=18390, timeout=3)
    deploy_env(env.spec(), service="vllm", quiet=True)
    before = env.running()
    env.write({"m-a": {"model": "org/a", "port": 18311, "env": {"FAKE_VLLM_FAIL": "never-ready"}}},
              api_port=18390, timeout=3)
    with pytest.raises(AlbertError, match="failed on 1 of 1 host"):
        deploy_env(env.spec(), service="vllm", quiet=True)
    assert env.running() == before
    assert env.get(18311, "/health").status_code == 200
    assert env.host.run(f"test -e {env.base}/deploy.lock", check=False).returncode


def test_crashing_server_fails_fast_with_its_log_lines(env, capsys):
    env.write({"m-a": {"model": "org/a", "port": 18321, "env": {"FAKE_VLLM_FAIL": "exit"}}},
              api_port=18391, timeout=60)
    t0 = time.monotonic()
    with pytest.raises(AlbertError):
        deploy_env(env.spec(), service="vllm")
    assert time.monotonic() - t0 < 15
    assert "failed to load the model" in capsys.readouterr().out
    assert env.running() == {}


@pytest.mark.parametrize("python, found", [
    ("/nonexistent/python3", "was not found on the host"),
    (str(CACHE / "old-python" / "python"), "is Python 3.8")], ids=["missing", "too-old"])
def test_vllm_python_too_old_or_missing_is_refused(env, python, found):
    old = CACHE / "old-python" / "python"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text("#!/bin/sh\necho 3.8\n")
    old.chmod(0o755)
    env.write({"m-a": {"model": "org/a", "port": 18331}}, api_port=18392, python=python)
    with pytest.raises(AlbertError) as err:
        deploy_env(env.spec(), service="vllm", quiet=True)
    text = str(err.value)
    assert f"{python} {found}" in text and "3.10 or newer" in text and "vllm.python" in text
    assert env.running() == {}


def test_api_redeploy_loses_no_request(env):
    env.write({"m-a": {"model": "org/a", "port": 18341}}, api_port=18393)
    deploy_env(env.spec(), quiet=True)
    with chat_load(f"http://{env.host.address}:18393", "m-a", clients=3) as load:
        for version in ("2", "3"):
            env.write({"m-a": {"model": "org/a", "port": 18341}}, api_port=18393,
                      vllm_env={"FAKE_API_VERSION": version})
            res = deploy_env(env.spec(), service="api", quiet=True)
            assert res[0].status == "deployed"
    assert load.ok > 20 and load.errors == []


def test_sigterm_to_supervisor_is_a_clean_stop(env):
    """`albert supervise stop` (what down and a replace do) leaves no process and no listener."""
    env.write({"m-a": {"model": "org/a", "port": 18351}}, api_port=18394)
    deploy_env(env.spec(), service="vllm", quiet=True)
    st = env.supervised()[f"albert-{env.name}-vllm-m-a"]
    down_env(env.spec())
    for pid in (st["pid"], st["supervisor_pid"]):  # gone (or a zombie until init reaps it)
        assert env.host.run(["ps", "-o", "stat=", "-p", str(pid)], check=False).stdout.strip() in ("", "Z")
    assert not env.host.run("ss -Hltn 'sport = :18351'").stdout.strip()


def test_setup_reloads_the_running_api_when_the_whitelist_changes(env):
    """A new whitelist reaches the api without a redeploy: setup sends it SIGHUP."""
    models = {"m-a": {"model": "org/a", "port": 18361}}

    def write(domains: list[str]) -> None:
        env.write(models, api_port=18394, extra=f"[whitelist]\nallow_domains = {json.dumps(domains)}\n")

    def header() -> str:
        return env.get(18394, "/v1/models").headers["x-albert-whitelist"]

    write(["service-public.fr"])
    assert not [o.error for o in setup_env(env.spec(), service="api") if o.error]
    deploy_env(env.spec(), quiet=True)
    before = header()
    api_pids = {n: s["pid"] for n, s in env.supervised().items() if "-api-" in n}
    write(["service-public.fr", "impots.gouv.fr", "ameli.fr"])
    outcomes = setup_env(env.spec(), service="api")
    assert not [o.error for o in outcomes if o.error]
    assert "api reloaded" in outcomes[0].value.summary()
    after = wait_for(lambda: header() != before and header())
    assert before.startswith("flag; entries=") and after.startswith("flag; entries=")
    assert int(after.split("=")[1]) > int(before.split("=")[1])
    assert {n: s["pid"] for n, s in env.supervised().items() if "-api-" in n} == api_pids
    again = setup_env(env.spec(), service="api")  # same whitelist: nothing to reload
    assert "api reloaded" not in again[0].value.summary()


def test_check_runs_the_preflight_and_changes_nothing(env):
    env.write({"m-a": {"model": "org/a", "port": 18371}}, api_port=18395)
    (result,) = deploy_env(env.spec(), check=True, quiet=True)
    assert result.status == "ready" and result.ok
    assert env.running() == {}
    assert env.host.run(f"test -e {env.base}/releases", check=False).returncode  # nothing written
    env.write({"m-a": {"model": "org/a", "port": 18371}}, api_port=18395, python="/nowhere/python")
    with pytest.raises(AlbertError, match="/nowhere/python was not found"):
        deploy_env(env.spec(), check=True, quiet=True)
    assert env.running() == {}
