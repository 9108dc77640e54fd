"""What only the venv runtime has: ``albert supervise`` keeping the servers alive, the vLLM
interpreter check, a clean stop, and setup reloading the running api. The deploy scenarios both
runtimes share are in test_deploy.py (parametrised over the runtimes)."""

from __future__ import annotations

import contextlib
import json

import pytest

from pyalbert.engine.operations import deploy_env, down_env, status_env
from pyalbert.engine.setup import setup_env
from pyalbert.errors import AlbertError
from pyalbert.remote import SSHRunner
from pyalbert.runtimes import runtime_for
from tests.support.runtimes import CACHE

pytestmark = pytest.mark.parametrize("runtime_host", ["venv"], indirect=True)


def wait_for(predicate, timeout: float = 20.0):
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            value = predicate()
            if value:
                return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout:g}s")


def test_a_killed_server_is_restarted_by_its_supervisor(env):
    env.write({"m-b": {"model": "org/b", "port": 18302}}, api_port=18380)
    deploy_env(env.spec(), service="vllm", quiet=True)
    n = env.name
    victim = env.supervised()[f"albert-{n}-vllm-m-b"]
    env.host.run(["kill", "-KILL", str(victim["pid"])])
    back = wait_for(lambda: (s := env.supervised().get(f"albert-{n}-vllm-m-b"))
                    and s["pid"] not in (None, victim["pid"]) and s)
    assert back["restarts"] == 1 and back["supervisor_pid"] == victim["supervisor_pid"]
    assert wait_for(lambda: env.chat(18302, "m-b") == "echo: hi")
    spec = env.spec()
    rows = {r["name"]: r for r in status_env(spec)[env.host.name]["rows"]}
    assert "restarts 1" in rows[f"albert-{n}-vllm-m-b"]["status"]
    with contextlib.closing(SSHRunner(spec.env.hosts[0], spec.env.ssh)) as r:
        log = r.run(runtime_for(spec.env).logs(f"albert-{n}-vllm-m-b", 20)).stdout
    assert "fake vllm: model" in log and "exited with -9" in log


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


def test_check_names_a_missing_vllm_interpreter(env):
    env.write({"m-a": {"model": "org/a", "port": 18371}}, api_port=18395, python="/nowhere/python")
    with pytest.raises(AlbertError, match="/nowhere/python was not found"):
        deploy_env(env.spec(), check=True, quiet=True)
    assert env.running() == {}


# -- roll back for real (issue 15) -------------------------------------------------------------

def test_rollback_under_random_kills_of_the_failing_unit_always_ends_serving(env):
    """The failing unit's supervisor is still in its restart loop (and gets SIGKILLed, itself or
    its child, at a random moment) while the rollback stops it and starts the previous release
    under the same name: every run ends with the previous release serving (seeded, bounded)."""
    import random
    import threading
    import time

    env.write({"m-a": {"model": "org/a", "port": 18361}}, api_port=18396, timeout=5)
    deploy_env(env.spec(), service="vllm", quiet=True)
    before = env.running()
    name = f"albert-{env.name}-vllm-m-a"
    rng = random.Random(15)
    env.write({"m-a": {"model": "org/a", "port": 18361, "env": {"FAKE_VLLM_FAIL": "exit"}}},
              api_port=18396, timeout=5)
    bad = env.spec()
    kills = 0

    def killer(delay: float, target: str, done: threading.Event) -> None:
        nonlocal kills
        end = time.monotonic() + 10
        t0 = time.monotonic()
        while not done.is_set() and time.monotonic() < end:
            st = env.supervised().get(name)
            if (st and st["labels"]["albert.config-hash"] != before[name]
                    and time.monotonic() - t0 >= delay and st.get(target)):
                env.host.run(["kill", "-KILL", str(st[target])], check=False)
                kills += 1
                return
            time.sleep(0.02)

    for run in range(20):
        done = threading.Event()
        t = threading.Thread(target=killer, args=(rng.uniform(0, 1.5),
                                                  rng.choice(["pid", "supervisor_pid"]), done))
        t.start()
        try:
            with pytest.raises(AlbertError) as err:
                deploy_env(bad, service="vllm", quiet=True)
        finally:
            done.set()
            t.join()
        assert "NOT serving" not in str(err.value), f"run {run}: {err.value}"
        assert env.running() == before, f"run {run}"
        assert env.host.run("curl -sf 127.0.0.1:18361/health", check=False).returncode == 0, f"run {run}"
    assert kills >= 5  # the chaos happened


def test_a_previous_release_that_does_not_come_back_fails_loudly(env, capsys):
    """The rollback waits for the previous release like a deploy; not ready = a failed run that
    says so, with the unit's last log lines (not "rolled back ... (previous)")."""
    flag = CACHE / f"broken-{env.name}"
    wrapper = CACHE / f"vllm-wrapper-{env.name}"
    flag.unlink(missing_ok=True)
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *vllm.entrypoints*) if [ -e {flag} ]; then '
                       f'echo "wrapper: the previous release cannot start"; exit 1; fi;; esac\n'
                       f'exec {env.rh.vllm} "$@"\n')
    wrapper.chmod(0o755)
    env.write({"m-a": {"model": "org/a", "port": 18371}}, api_port=18397, timeout=5,
              python=str(wrapper))
    deploy_env(env.spec(), service="vllm", quiet=True)
    flag.write_text("")
    env.write({"m-a": {"model": "org/a", "port": 18371, "env": {"FAKE_VLLM_FAIL": "exit"}}},
              api_port=18397, timeout=5, python=str(wrapper))
    try:
        with pytest.raises(AlbertError) as err:
            deploy_env(env.spec(), service="vllm")
    finally:
        flag.unlink(missing_ok=True)
    text, out = str(err.value), capsys.readouterr().out
    assert "rolled back but NOT serving" in text and "serve NEITHER release" in text
    assert "the previous release cannot start" in out  # the unit's last log lines
    assert "(previous)" not in out
    # status tells the truth: the model server the release declares is shown, and not serving
    st = status_env(env.spec())[env.host.name]
    rows = {r["name"]: r for r in st["rows"]}
    name = f"albert-{env.name}-vllm-m-a"
    assert rows[name]["verdict"] in ("stopped", "failed", "crash-looping", "not ready")
    assert st["not_serving"] == [f"{name}: {rows[name]['verdict']}"]


def test_a_change_that_cannot_start_is_refused_before_anything_stops(env):
    """max_model_len over the model's limit (its config.json on the host): refused by the
    preflight, naming the key and the fix; the serving server never stops (0 failed requests)."""
    import threading

    from tests.support.runtimes import STORAGE

    env.write({"m-fit": {"model": "org/fit", "port": 18381}}, api_port=18398, timeout=5)
    (STORAGE / "m-fit" / "config.json").write_text(json.dumps(
        {"max_position_embeddings": 8192, "num_attention_heads": 32}))
    deploy_env(env.spec(), service="vllm", quiet=True)
    before = env.running()
    stop, sent, failed = threading.Event(), [0], []

    def load() -> None:  # asked on the host: the model port listens there only (issue 14)
        while not stop.is_set():
            sent[0] += 1
            res = env.host.run("curl -sf -o /dev/null -w %{http_code} 127.0.0.1:18381/health",
                               check=False)
            if res.returncode or res.stdout.strip() != "200":
                failed.append(res.stdout.strip() or f"exit {res.returncode}")

    t = threading.Thread(target=load)
    t.start()
    try:
        env.write({"m-fit": {"model": "org/fit", "port": 18381, "max_model_len": 999999}},
                  api_port=18398, timeout=5)
        with pytest.raises(AlbertError) as err:
            deploy_env(env.spec(), service="vllm", quiet=True)
    finally:
        stop.set()
        t.join()
    text = str(err.value)
    assert "max_model_len 999999 is more than the model allows (8192, max_position_embeddings" in text
    assert "set max_model_len to 8192 or less in the routing-table entry 'm-fit'" in text
    assert env.running() == before
    assert sent[0] > 0 and failed == []
