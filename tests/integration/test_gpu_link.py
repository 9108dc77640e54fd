"""link-gpu / unlink-gpu on a real namespace host (sshd + dockerd, fake vLLM image).

The lease file, the hooks (they append a line to a marker file on the host) and the vLLM containers
are looked at on the host itself. ``nvidia-smi`` is a fake script in the gitlab user's
``~/bin``, put on the SSH command PATH by ``~/.bashrc`` (bash reads it for ``ssh host cmd``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pyalbert.engine.gpu_lease import link_gpu_env, unlink_gpu_env
from pyalbert.engine.operations import deploy_env, down_env
from pyalbert.errors import AlbertError
from tests.support.runtimes import Env, RuntimeHost

REPO = Path(__file__).resolve().parents[2]
MARKER = "/home/gitlab/gpu-hooks.log"
HOOKS = f"""
[gpu_link]
enabled = true
lease_minutes = 30
attach_hook = 'echo "attach $ALBERT_PIPELINE $ALBERT_HOST" >> {MARKER}'
detach_hook = 'echo "detach $ALBERT_PIPELINE $ALBERT_HOST" >> {MARKER}'
"""


@pytest.fixture(scope="module")
def host(fake_vllm_host):
    return fake_vllm_host


@pytest.fixture
def env(host, tmp_path, monkeypatch, request):
    h, image = host
    name = "g" + request.node.name.replace("test_", "").replace("_", "")[:16].lower()
    e = Env(RuntimeHost("docker", h, image), tmp_path / "config", monkeypatch, name)
    monkeypatch.setenv("GITLAB_USER_LOGIN", "alice")
    monkeypatch.setenv("CI_PIPELINE_ID", "101")
    h.run(f"rm -f {MARKER} /home/gitlab/bin/nvidia-smi")
    yield e
    with contextlib.suppress(Exception):
        down_env(e.spec())


def lease_on(e: Env) -> dict | None:
    out = e.host.run(f"cat /home/gitlab/albert-{e.name}/gpu-lease.json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def marker(e: Env) -> list[str]:
    return e.host.run(f"cat {MARKER}", check=False).stdout.splitlines()


def vllm_containers(e: Env) -> list[str]:
    return [n for n in e.running() if "-vllm-" in n]


def test_link_takes_renews_refuses_another_pipeline_and_takes_over_an_expired_lease(
        env, monkeypatch):
    env.write({"m-a": {"model": "org/a", "port": 18401}}, api_port=18480, extra=HOOKS)
    (host_name, said), = link_gpu_env(env.spec()).items()
    assert said.startswith("lease taken for pipeline 101 until ") and "attach hook run" in said
    lease = lease_on(env)
    assert lease["pipeline"] == "101" and lease["who"].startswith("alice@")
    assert lease["env"] == env.name
    expires = datetime.fromisoformat(lease["expires"])
    assert timedelta(minutes=29) < expires - datetime.now(timezone.utc) <= timedelta(minutes=30)
    assert marker(env) == [f"attach 101 {host_name}"]

    (again,) = link_gpu_env(env.spec()).values()
    assert again.startswith("already linked: lease of pipeline 101 renewed")

    monkeypatch.setenv("CI_PIPELINE_ID", "202")
    monkeypatch.setenv("GITLAB_USER_LOGIN", "bob")
    with pytest.raises(AlbertError, match=r"leased to pipeline 101 of alice@.*this is pipeline 202"):
        link_gpu_env(env.spec())
    assert lease_on(env)["pipeline"] == "101"
    # the fab task says the same, one paragraph, exit 1
    fab = subprocess.run([str(REPO / ".venv/bin/fab"), "-r", "deploy", "link-gpu", "--env",
                          env.name, "--config-dir", str(env.root)], cwd=REPO, env=dict(os.environ),
                         capture_output=True, text=True, timeout=60)
    assert fab.returncode == 1, fab.stdout + fab.stderr
    assert "leased to pipeline 101 of alice@" in fab.stderr and "Traceback" not in fab.stderr

    # pipeline 101 died without unlink-gpu and left a vLLM server; its lease expires
    monkeypatch.setenv("CI_PIPELINE_ID", "101")
    deploy_env(env.spec(), service="vllm", quiet=True)
    assert vllm_containers(env) == [f"albert-{env.name}-vllm-m-a"]
    monkeypatch.setenv("CI_PIPELINE_ID", "202")
    later = datetime.now(timezone.utc) + timedelta(minutes=31)
    (took,) = link_gpu_env(env.spec(), now=later).values()
    assert took.startswith("expired lease of pipeline 101 of alice@") and "stopped 1 vLLM" in took
    assert lease_on(env)["pipeline"] == "202" and lease_on(env)["who"].startswith("bob@")
    assert vllm_containers(env) == []


def test_unlink_stops_vllm_releases_our_lease_runs_the_detach_hook_and_is_idempotent(env,
                                                                                    monkeypatch):
    env.write({"m-a": {"model": "org/a", "port": 18411}}, api_port=18481, extra=HOOKS)
    link_gpu_env(env.spec())
    deploy_env(env.spec(), quiet=True)
    assert vllm_containers(env) == [f"albert-{env.name}-vllm-m-a"]

    # another pipeline's unlink (e.g. after its refused link) touches nothing of ours
    monkeypatch.setenv("CI_PIPELINE_ID", "303")
    (left,) = unlink_gpu_env(env.spec()).values()
    assert left.startswith("left alone: the GPUs are leased to pipeline 101")
    assert lease_on(env)["pipeline"] == "101" and len(vllm_containers(env)) == 1

    monkeypatch.setenv("CI_PIPELINE_ID", "101")
    (host_name, said), = unlink_gpu_env(env.spec()).items()
    assert said == "stopped 1 vLLM server(s); lease released; detach hook run"
    assert lease_on(env) is None and vllm_containers(env) == []
    assert f"albert-{env.name}-api" in env.running()  # only the GPU side goes
    assert marker(env) == [f"attach 101 {host_name}", f"detach 101 {host_name}"]

    (again,) = unlink_gpu_env(env.spec()).values()
    assert again == "already unlinked: no vLLM server running, no lease held; detach hook run"
    assert lease_on(env) is None


def test_unlink_after_a_failed_pipeline_and_a_failing_hook(env):
    env.write({"m-a": {"model": "org/a", "port": 18421}}, api_port=18482, extra=HOOKS)
    # the pipeline failed before link-gpu: nothing on the host (no base dir even)
    (said,) = unlink_gpu_env(env.spec()).values()
    assert said.startswith("already unlinked: no vLLM server running, no lease held")

    env.write({"m-a": {"model": "org/a", "port": 18421}}, api_port=18482,
              extra=HOOKS.replace("attach_hook = '", "attach_hook = 'echo no credentials >&2; "
                                  "exit 4; "))
    with pytest.raises(AlbertError, match=r"attach hook .* failed with exit code 4: no credentials"):
        link_gpu_env(env.spec())
    (said,) = unlink_gpu_env(env.spec()).values()  # the failed link's lease goes
    assert said == "stopped 0 vLLM server(s); lease released; detach hook run"
    assert lease_on(env) is None


def test_gpu_link_off_is_a_no_op(env):
    env.write({"m-a": {"model": "org/a", "port": 18431}}, api_port=18483)
    (said,) = link_gpu_env(env.spec()).values()
    assert said.startswith(f"GPU link is off for {env.name}") and lease_on(env) is None


FAKE_SMI = """#!/bin/sh
[ "$1" = "--query-gpu=index,memory.free,memory.total" ] || exit 9
cat /home/gitlab/smi.out
"""


def test_free_gpu_memory_is_checked_with_nvidia_smi(env):
    h = env.host
    h.run("mkdir -p /home/gitlab/bin && cat > /home/gitlab/bin/nvidia-smi && "
          "chmod 755 /home/gitlab/bin/nvidia-smi && "
          "grep -q HOME/bin /home/gitlab/.bashrc 2>/dev/null || "
          "sed -i '1i PATH=\"$HOME/bin:$PATH\"' /home/gitlab/.bashrc 2>/dev/null || "
          "echo 'PATH=\"$HOME/bin:$PATH\"' > /home/gitlab/.bashrc; "
          "chown -R gitlab /home/gitlab/bin /home/gitlab/.bashrc", input=FAKE_SMI)
    h.run("echo '0, 1200, 81920' > /home/gitlab/smi.out")
    text = (env.root / "environments").joinpath(f"{env.name}.toml")
    env.write({"m-a": {"model": "org/a", "port": 18441, "gpu_mem_use": 0.5}}, api_port=18484,
              extra=HOOKS)
    text.write_text(text.read_text().replace("gpus = 0", "gpus = 1"))
    with pytest.raises(AlbertError, match=r"GPU 0: 1200 MiB free, 40960 MiB needed"):
        link_gpu_env(env.spec())
    assert lease_on(env) is None and marker(env) == []  # no lease kept, no GPU attached

    h.run("echo '0, 80000, 81920' > /home/gitlab/smi.out")
    (said,) = link_gpu_env(env.spec()).values()
    assert "GPU memory checked on 1 GPU(s)" in said and lease_on(env)["pipeline"] == "101"
