"""fab deploy on real namespace hosts, one scenario list run on both runtimes.

Each scenario runs twice: on a host with its own dockerd and the fake vLLM image (``docker``), and
on a host without Docker where ``albert supervise`` keeps the fake vLLM processes alive from a venv
(``venv``) (:mod:`tests.support.runtimes`). One module-scoped host per runtime; each test deploys
its own environment name, so the units, ports and releases of one test never meet another's, and
``down`` cleans up. What only one runtime has lives in test_venv_runtime.py (the supervisor) and
at the end of this file (docker).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.engine.operations import (
    deploy_env,
    down_env,
    list_releases,
    lock_env,
    purge_cache_env,
    rollback_env,
    status_env,
    unlock_env,
)
from pyalbert.errors import AlbertError
from pyalbert.remote import SSHRunner
from pyalbert.runtimes import runtime_for
from tests.support.runtimes import STORAGE
from tests.support.traffic import chat_load


def test_deploy_noop_change_status_logs_rollback_down(env):
    models = {"m-a": {"model": "org/a", "port": 18101},
              "m-b": {"model": "org/b", "port": 18102, "env": {"FAKE_VLLM_START_DELAY": "1"}}}
    env.write(models, api_port=18180)
    results = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in results] == ["deployed"]
    assert env.chat(18101, "m-a") == "echo: hi"
    assert [m["id"] for m in env.get(18102, "/v1/models").json()["data"]] == ["m-b"]
    assert {m["id"] for m in env.get(18180, "/v1/models").json()["data"]} == {"m-a", "m-b"}
    assert env.chat(18180, "m-b") == "echo: hi"  # through the edge and the api
    first = env.running()
    n = env.name
    assert set(first) == {f"albert-{n}-vllm-m-a", f"albert-{n}-vllm-m-b", f"albert-{n}-api",
                          f"albert-{n}-api-blue"}
    mode = env.host.run(f"stat -c %a {env.base}/releases/*/albert-{n}-vllm-m-a.env").stdout.strip()
    assert mode == "600"

    # no-op: nothing restarts and it says so (how fast it is lives in bench/deploy.py)
    again = deploy_env(env.spec(), quiet=True)
    assert [r.status for r in again] == ["unchanged"] and not again[0].changed
    assert env.running() == first

    # a config change restarts only that model (and the api, whose config folder holds the table)
    models["m-a"]["env"] = {"X": "2"}
    env.write(models, api_port=18180)
    changed = deploy_env(env.spec(), quiet=True)[0]
    assert changed.changed == [f"albert-{n}-vllm-m-a", f"albert-{n}-api"]
    now = env.running()
    assert now[f"albert-{n}-vllm-m-b"] == first[f"albert-{n}-vllm-m-b"]
    assert now[f"albert-{n}-vllm-m-a"] != first[f"albert-{n}-vllm-m-a"]
    assert set(now) == {f"albert-{n}-vllm-m-a", f"albert-{n}-vllm-m-b", f"albert-{n}-api",
                        f"albert-{n}-api-green"}

    # status and logs show the units
    spec = env.spec()
    by_name = {r["name"]: r for r in status_env(spec)[env.host.name]["rows"]}
    assert set(by_name) == set(now)  # the stopped blue colour is gone
    assert by_name[f"albert-{n}-vllm-m-a"]["health"] == "ok"
    assert by_name[f"albert-{n}-api"]["health"] == "ok"
    with contextlib.closing(SSHRunner(spec.env.hosts[0], spec.env.ssh)) as r:
        log = r.run(runtime_for(spec.env).logs(f"albert-{n}-vllm-m-b", 20)).stdout
    assert "fake vllm: model" in log

    # rollback to the first release: m-a goes back to its first config
    (current, items), = list_releases(spec).values()
    assert len(items) == 2 and current == items[-1]["id"]
    back = rollback_env(spec, quiet=True)
    assert back[0].status == "rolled back to" and back[0].release == items[0]["id"]
    assert env.running()[f"albert-{n}-vllm-m-a"] == first[f"albert-{n}-vllm-m-a"]
    assert env.chat(18101, "m-a") == "echo: hi"

    # down stops everything; status then lists nothing
    serving = set(env.running())
    assert len(serving) == 4
    assert set(down_env(spec)[env.host.name]) == serving
    assert env.running() == {}
    assert status_env(spec)[env.host.name]["rows"] == []
    with pytest.raises(httpx.ConnectError):
        env.get(18101, "/health")


def test_readiness_timeout_rolls_back_and_previous_release_serves(env):
    env.write({"m-a": {"model": "org/a", "port": 18111}}, api_port=18190, timeout=3)
    deploy_env(env.spec(), service="vllm", quiet=True)
    before = env.running()
    env.write({"m-a": {"model": "org/a", "port": 18111, "env": {"FAKE_VLLM_FAIL": "never-ready"}}},
              api_port=18190, timeout=3)
    with pytest.raises(AlbertError, match="failed on 1 of 1 host"):
        deploy_env(env.spec(), service="vllm", quiet=True)
    assert env.running() == before
    assert env.get(18111, "/health").status_code == 200
    assert env.host.run(f"test -e {env.base}/deploy.lock", check=False).returncode


def test_crashing_server_fails_fast_with_its_log_lines(env, capsys):
    env.write({"m-a": {"model": "org/a", "port": 18121, "env": {"FAKE_VLLM_FAIL": "exit"}}},
              api_port=18191, timeout=60)
    t0 = time.monotonic()
    with pytest.raises(AlbertError):
        deploy_env(env.spec(), service="vllm")
    assert time.monotonic() - t0 < 30
    assert "failed to load the model" in capsys.readouterr().out
    assert env.running() == {}


def test_lock_held_fails_at_once_naming_the_holder(env):
    env.write({"m-a": {"model": "org/a", "port": 18131}}, api_port=18192)
    lock_env(env.spec(), message="db migration")
    try:
        with pytest.raises(AlbertError, match="db migration"):
            deploy_env(env.spec(), quiet=True)
        assert env.running() == {}
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


def test_api_redeploy_loses_no_request(env):
    env.write({"m-a": {"model": "org/a", "port": 18201}}, api_port=18280)
    deploy_env(env.spec(), quiet=True)
    with chat_load(f"http://{env.host.address}:18280", "m-a", clients=3) as load:
        for version in ("2", "3"):
            env.write({"m-a": {"model": "org/a", "port": 18201}}, api_port=18280,
                      vllm_env={"FAKE_API_VERSION": version})
            res = deploy_env(env.spec(), service="api", quiet=True)
            assert res[0].status == "deployed"
    assert load.ok > 20 and load.errors == []


def test_nothing_bypasses_the_gateway(env, capfd):
    """Issue 14: a model port is closed to other machines (loopback) and needs the servers' key
    even on its own host; through the gateway it works; the key is in no dry-run and no ``ps``.

    The other machine is this test process's network namespace, on the host's link: namespace
    hosts have no route to each other (this machine's FORWARD policy is DROP)."""
    from pyalbert.engine import vllm_key

    env.write({"m-k": {"model": "org/k", "port": 18131}}, api_port=18191)
    deploy_env(env.spec(), quiet=True)
    with pytest.raises(httpx.ConnectError):  # refused: nothing listens on the host's address
        httpx.get(f"http://{env.host.address}:18131/v1/models", timeout=5)
    assert env.chat(18191, "m-k") == "echo: hi"  # through the edge and the gateway
    curl = ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}"]
    # on the host itself: /v1/* without the key is refused as vLLM does, /health stays open
    local = env.host.run([*curl, "http://127.0.0.1:18131/v1/models"], check=False).stdout
    assert local.splitlines() == ['{"error": "Unauthorized"}', "401"]
    assert env.get(18131, "/health").status_code == 200
    assert env.get(18131, "/v1/models").status_code == 200  # with the header file: the key
    # the key: 0600 files only, in no process's arguments, not in the dry-run
    key = vllm_key.resolve(env.spec().env)
    modes = env.host.run(f"stat -c %a {env.header_file} {env.base}/releases/*/upstream.key "
                         f"{env.base}/releases/*/albert-{env.name}-vllm-m-k.env").stdout.split()
    assert set(modes) == {"600"}
    assert key in env.host.run(f"cat {env.header_file}").stdout  # the key that was derived
    assert key not in env.host.run(["ps", "axww", "-o", "args"]).stdout
    capfd.readouterr()
    deploy_env(env.spec(), dry_run=True)
    out = capfd.readouterr()
    assert key not in out.out + out.err and "upstream.key" in out.out


def test_check_runs_the_preflight_and_changes_nothing(env):
    env.write({"m-a": {"model": "org/a", "port": 18171}}, api_port=18196)
    (result,) = deploy_env(env.spec(), check=True, quiet=True)
    assert result.status == "ready" and result.ok
    assert env.running() == {}
    assert env.host.run(f"test -e {env.base}/releases", check=False).returncode  # nothing written


def test_compile_cache_cold_then_warm_restart_status_and_purge(env):
    """Issue 21: the first start compiles (cold), a restart of the unchanged server finds the
    artefacts (warm, said per server), and so does a rollback; status sizes it, purge empties it."""
    models = {"m-c": {"model": "org/c", "port": 18121}}
    env.write(models, api_port=18190)
    spec = env.spec()
    purge_cache_env(spec)  # the host's cache outlives environments: this test starts from none
    name = f"albert-{env.name}-vllm-m-c"
    first = deploy_env(spec, service="vllm", quiet=True)[0]
    assert first.status == "deployed" and first.starts[name][0] == "cold"
    tree = ".vllm-cache/" + ("venv-" if env.runtime == "venv" else "docker-")
    found = env.host.run(f"ls {STORAGE}/{tree}*/torch_compile_cache/fake").stdout.split()
    assert found == ["m-c.graph"]  # the server wrote into the tree it was given
    kib = status_env(spec)[env.host.name]["cache_kib"]
    assert kib > 0

    # a restart of the unchanged server (stopped, deployed again): warm
    down_env(spec)
    again = deploy_env(spec, service="vllm", quiet=True)[0]
    assert again.status == "deployed" and again.starts[name][0] == "warm"

    # a rollback to the first release restarts the server from the same tree: warm too
    models["m-c"]["env"] = {"X": "2"}
    env.write(models, api_port=18190)
    deploy_env(env.spec(), service="vllm", quiet=True)
    back = rollback_env(env.spec(), quiet=True)[0]
    assert back.status == "rolled back to" and back.starts[name][0] == "warm"

    # purge: this runtime's trees go, twice is fine (idempotent), the next start is cold
    for _ in range(2):
        purge_cache_env(spec)
        left = env.host.run(f"ls -d {STORAGE}/{tree}* 2>/dev/null || true").stdout.split()
        assert left == []
    down_env(spec)
    cold = deploy_env(spec, service="vllm", quiet=True)[0]
    assert cold.starts[name][0] == "cold"


# --- docker only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime_host", ["docker"], indirect=True)
def test_docker_missing_says_run_provision(env):
    env.write({"m-a": {"model": "org/a", "port": 18172}}, api_port=18197)
    text = (env.root / "environments" / f"{env.name}.toml").read_text()
    # a host user outside the docker group cannot talk to dockerd: same symptom as no docker
    (env.root / "environments" / f"{env.name}.toml").write_text(text.replace('user = "gitlab"',
                                                                              'user = "nobody"'))
    with pytest.raises(AlbertError):
        deploy_env(env.spec(), quiet=True)


def test_status_names_a_stopped_and_a_crash_looping_server_and_fails(env):
    """Issue 15 item 2 on both runtimes: a declared server that was stopped, and one whose process
    dies and then cannot start again (its runtime restarts it in a loop), are shown with their
    verdict, never as running, and `fab status` exits non-zero naming them."""
    models = {"m-s": {"model": "org/s", "port": 18441},
              "m-c": {"model": "org/c", "port": 18442, "env": {"FAKE_VLLM_REQUIRE_MODEL_DIR": "1"}}}
    env.write(models, api_port=18493)
    deploy_env(env.spec(), service="vllm", quiet=True)
    spec, n = env.spec(), env.name
    stopped, looping = f"albert-{n}-vllm-m-s", f"albert-{n}-vllm-m-c"
    rt = runtime_for(spec.env)
    with contextlib.closing(SSHRunner(spec.env.hosts[0], spec.env.ssh)) as r:
        r.run(rt.stop(stopped))
    # the model's folder becomes a file: the server exits at once on both runtimes (docker's -v
    # would make a missing folder again, empty, and the server would start from it)
    gone = STORAGE / "m-c.gone"
    (STORAGE / "m-c").rename(gone)
    (STORAGE / "m-c").write_text("not a model folder\n")
    try:
        # the server's process dies; its runtime starts it again, and it exits at once
        pid = (env.supervised()[looping]["pid"] if env.runtime == "venv" else
               env.host.run(["docker", "inspect", "-f", "{{.State.Pid}}", looping]).stdout.strip())
        env.host.run(["kill", "-KILL", str(pid)])
        seen: set[str] = set()
        deadline = time.monotonic() + 40
        # crash-looping while its runtime restarts it; failed once the runtime gives up (docker's
        # restart limit, reached between two polls on a loaded machine)
        while not seen & {"crash-looping", "failed"} and time.monotonic() < deadline:
            st = status_env(spec)[env.host.name]
            rows = {r["name"]: r for r in st["rows"]}
            assert rows[stopped]["verdict"] == "stopped", rows[stopped]
            seen.add(rows[looping]["verdict"])
            assert rows[looping]["verdict"] != "running", rows[looping]
            assert f"{stopped}: stopped" in st["not_serving"], st["not_serving"]
            time.sleep(0.5)
        assert seen & {"crash-looping", "failed"}, seen
        fab = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "fab"
        cli = subprocess.run([str(fab), "-r", "deploy", "status", "--env", n, "--config-dir",
                              str(env.root)], capture_output=True, text=True, timeout=120,
                             cwd=fab.parents[2], env={**os.environ, "COLUMNS": "300"})
        assert cli.returncode != 0, cli.stdout + cli.stderr
        assert stopped in cli.stdout + cli.stderr and looping in cli.stdout + cli.stderr
    finally:
        (STORAGE / "m-c").unlink()
        gone.rename(STORAGE / "m-c")


@pytest.mark.parametrize("runtime_host", ["docker"], indirect=True)  # venv: test_venv_runtime.py
def test_docker_rollback_waits_for_the_previous_release_and_fails_loudly(env, capsys):
    """Issue 15 item 1 on docker: the rollback waits for the previous release like a deploy; when
    it cannot start again (its model folder became a file), the run fails saying "rolled back but
    NOT serving" with the container's last log lines, and status names the server."""
    model = {"model": "org/r", "port": 18451, "env": {"FAKE_VLLM_REQUIRE_MODEL_DIR": "1"}}
    env.write({"m-r": model}, api_port=18494, timeout=5)
    deploy_env(env.spec(), service="vllm", quiet=True)
    env.write({"m-r": {**model, "env": {**model["env"], "FAKE_VLLM_FAIL": "exit"}}},
              api_port=18494, timeout=5)
    gone = STORAGE / "m-r.gone"
    (STORAGE / "m-r").rename(gone)
    (STORAGE / "m-r").write_text("not a model folder\n")
    try:
        with pytest.raises(AlbertError) as err:
            deploy_env(env.spec(), service="vllm")
        text, out = str(err.value), capsys.readouterr().out
        assert "rolled back but NOT serving" in text and "serve NEITHER release" in text, text
        assert "does not exist" in out  # the previous release's container's last log lines
        assert "(previous)" not in out
        st = status_env(env.spec())[env.host.name]
        name = f"albert-{env.name}-vllm-m-r"
        verdict = {r["name"]: r["verdict"] for r in st["rows"]}[name]
        assert verdict in ("stopped", "failed", "crash-looping", "not ready")
        assert st["not_serving"] == [f"{name}: {verdict}"]
    finally:
        (STORAGE / "m-r").unlink()
        gone.rename(STORAGE / "m-r")
