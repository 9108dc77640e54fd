"""Kill -9 anywhere converges (issue 15, item 5).

A real ``fab deploy`` (a subprocess) of a changed release on two namespace hosts is SIGKILLed at a
seeded random moment of its run. Whatever it left behind, a plain re-run converges: when the dead
deployer's lock is still there, the re-run refuses naming its holder (pid) and age, ``fab unlock``
clears it; then ``fab deploy`` ends with every host serving the desired release (the gateway of
each host answers a chat, a further deploy restarts nothing, the ``current`` release records what
runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.commands import release
from pyalbert.engine.operations import deploy_env, down_env
from tests.support.runtimes import Env, make_runtime_host

REPO = Path(__file__).resolve().parents[2]
FAB = REPO / ".venv" / "bin" / "fab"
#: seeds per runtime (>= 20 in all)
SEEDS = {"venv": range(1, 15), "docker": range(101, 107)}


@pytest.fixture(scope="module", params=list(SEEDS))
def pair(request, make_host, tmp_path_factory):
    """Two hosts of one runtime."""
    return tuple(make_runtime_host(request.param, make_host, tmp_path_factory) for _ in range(2))


@pytest.fixture
def env(pair, tmp_path, monkeypatch):
    a, b = pair
    e = Env(a, tmp_path / "config", monkeypatch, f"{a.runtime[0]}kill9", others=(b,))
    yield e
    with contextlib.suppress(Exception):
        down_env(e.spec())


def fab(e: Env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(FAB), "-r", "deploy", *args, "--env", e.name, "--config-dir",
                           str(e.root)], cwd=REPO, env={**os.environ, "COLUMNS": "200"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def write(e: Env, generation: int) -> None:
    """A release that differs from the last one in the model server and the api; every other one
    leaves room for a second server (a replace beside the old one), the others none (in place)."""
    room = {"VLLM_CPU_KVCACHE_SPACE": "0"} if generation % 2 == 0 else {}
    e.write({"m-a": {"model": "org/a", "port": 18501, "replicas": 2,
                     "env": {"GENERATION": str(generation), **room}}},
            api_port=18580, timeout=10, vllm_env={"FAKE_API_VERSION": str(generation)})


def chat_through_each_gateway(e: Env) -> list[str]:
    body = {"model": "m-a", "messages": [{"role": "user", "content": "hi"}]}
    answers = []
    for host in e.hosts:
        r = httpx.post(f"http://{host.address}:18580/v1/chat/completions", json=body, timeout=10)
        answers.append(r.json()["choices"][0]["message"]["content"] if r.status_code == 200
                       else f"{host.name}: {r.status_code} {r.text}")
    return answers


def current_hashes(e: Env, host) -> dict[str, str]:
    """What the host's ``current`` release records: unit name -> config hash."""
    link = host.run(release.current(e.base).render(), check=False).stdout
    rel = release.parse_current(link)
    doc = json.loads(host.run(release.read_manifest(e.base, rel).render()).stdout)
    return {u["name"]: u["config_hash"] for u in doc["units"]}


def locked_hosts(e: Env) -> list[str]:
    return [h.name for h in e.hosts
            if h.run(f"test -e {e.base}/deploy.lock", check=False).returncode == 0]


def test_a_deploy_killed_at_a_random_moment_converges_on_a_plain_rerun(env, capsys):
    write(env, 0)
    first = fab(env, "deploy")
    assert first.returncode == 0, first.stdout
    # how long a changed deploy takes here: the kills land anywhere inside it
    write(env, 1)
    t0 = time.monotonic()
    timed = fab(env, "deploy")
    span = time.monotonic() - t0
    assert timed.returncode == 0, timed.stdout
    seeds = SEEDS[env.runtime]
    stats = {"lock left": 0, "finished first": 0}
    for seed in seeds:
        rng = random.Random(seed)
        write(env, seed + 1)
        cmd = [str(FAB), "-r", "deploy", "deploy", "--env", env.name, "--config-dir", str(env.root)]
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "COLUMNS": "200"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.2, 0.85 * span)  # the timed deploy was a slow one (in place)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        else:
            stats["finished first"] += 1
        proc.wait(30)
        where = f"seed {seed} (killed after {delay:.2f}s of ~{span:.1f}s)"

        left = locked_hosts(env)
        with capsys.disabled():
            print(f"\n{env.runtime} {where}: lock left on {left or 'no host'}", flush=True)
        if left:  # the dead deployer's lock: reported with its holder and age, then cleared
            stats["lock left"] += 1
            refused = fab(env, "deploy")
            assert refused.returncode != 0, f"{where}: {refused.stdout}"
            text = " ".join(refused.stdout.split())
            assert f"pid {proc.pid}" in text and " ago)" in text and "fab unlock" in text, \
                f"{where}: {refused.stdout}"
            unlocked = fab(env, "unlock")
            assert unlocked.returncode == 0, f"{where}: {unlocked.stdout}"
            assert f"pid {proc.pid}" in unlocked.stdout, f"{where}: {unlocked.stdout}"
            assert locked_hosts(env) == [], where

        rerun = fab(env, "deploy")
        assert rerun.returncode == 0, f"{where}: {rerun.stdout}"
        assert chat_through_each_gateway(env) == ["echo: hi", "echo: hi"], f"{where}: {rerun.stdout}"
        again = deploy_env(env.spec(), quiet=True)
        assert [r.status for r in again] == ["unchanged", "unchanged"], where
        for host in env.hosts:
            running, recorded = env.running(host), current_hashes(env, host)
            vllm = [n for n in recorded if "-vllm-" in n]
            assert vllm and all(running.get(n) == recorded[n] for n in vllm), \
                f"{where}: {host.name} runs {running}, its current release records {recorded}"
            # one server per replica: the slot a killed replace left beside it is stopped
            assert len([n for n in running if "-vllm-" in n]) == 1, f"{where}: {running}"
    with capsys.disabled():
        print(f"\n{env.runtime}: {len(seeds)} seeds, deploy ~{span:.1f}s, {stats}")
    assert stats["finished first"] < len(seeds) // 2  # the kills did land inside the deploys
