"""Ctrl-C in the middle of a real ``fab deploy`` (a subprocess) on a namespace host.

The new vLLM server is slow to start (``FAKE_VLLM_START_DELAY``) so the deploy is waiting for it to
be ready when SIGINT arrives. Afterwards: exit code 130, an "interrupted" message, the lock gone,
the previous release serving again, no container of the new release left.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyalbert.engine.operations import deploy_env, down_env
from tests.support.runtimes import Env, RuntimeHost

REPO = Path(__file__).resolve().parents[2]
FAB = REPO / ".venv" / "bin" / "fab"


@pytest.fixture(scope="module")
def host(fake_vllm_host):
    return fake_vllm_host


@pytest.fixture
def env(host, tmp_path, monkeypatch):
    h, image = host
    e = Env(RuntimeHost("docker", h, image), tmp_path / "config", monkeypatch, "dinterrupt")
    yield e
    with contextlib.suppress(Exception):
        down_env(e.spec())


def start_fab(e: Env, *args: str) -> tuple[subprocess.Popen, queue.Queue]:
    """``fab -r deploy ...`` from the repo root; its output lines arrive on the queue."""
    proc = subprocess.Popen([str(FAB), "-r", "deploy", *args, "--config-dir", str(e.root)],
                            cwd=REPO, env={**os.environ, "COLUMNS": "200"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_for(lines: queue.Queue, needle: str, seen: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            return False
        seen.append(line)
        if needle in line:
            return True
    return False


def test_ctrl_c_while_waiting_for_readiness_restores_the_previous_release(env):
    model = {"model": "org/a", "port": 18301}
    env.write({"m-a": model}, api_port=18380, timeout=120)
    deploy_env(env.spec(), service="vllm", quiet=True)
    name = f"albert-{env.name}-vllm-m-a"
    before = env.running()
    assert set(before) == {name}

    env.write({"m-a": {**model, "env": {"FAKE_VLLM_START_DELAY": "300"}}}, api_port=18380,
              timeout=120)
    proc, lines = start_fab(env, "deploy", "--env", env.name, "--service", "vllm")
    seen: list[str] = []
    try:
        assert wait_for(lines, f"starting {name}", seen, 60), "".join(seen)
        # the new container is up and answering 503 (loading): the deploy polls its readiness
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if env.get(18301, "/health").status_code == 503:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the slow new release never answered 503\n" + "".join(seen))
        assert env.running()[name] != before[name]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    while wait_for(lines, "\0", seen, 2):
        pass
    output = "".join(seen)
    print(output)

    assert code == 130, output
    assert "interrupted" in output.lower(), output
    assert "rolling back" in output and "(previous)" in output, output
    assert elapsed < 30, output
    assert env.host.run(f"test -e /home/gitlab/albert-{env.name}/deploy.lock",
                        check=False).returncode != 0, "the deploy lock was left behind"
    assert env.running() == before, "a container of the interrupted release is left"
    models = env.get(18301, "/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["m-a"]
    # nothing from the interrupted release blocks the next deploy
    env.write({"m-a": model}, api_port=18380, timeout=120)
    assert [r.status for r in deploy_env(env.spec(), service="vllm", quiet=True)] == ["unchanged"]
