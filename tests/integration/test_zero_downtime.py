"""Issue 15 item 4: a model's args change under constant client load (c=4, the openai client,
streamed and plain, through the edge and the real gateway of the venv runtime).

With room on the host the new server starts beside the old one on the spare port, the gateway
routes to it (routes folder), the old one drains and stops: no request fails. Without room
(the RAM estimate is made too large) the deploy says so and restarts in place: the only failures
are 503 answers with Retry-After.
"""

from __future__ import annotations

import pytest

from pyalbert.engine.operations import deploy_env
from tests.support.traffic import openai_load

pytestmark = pytest.mark.parametrize("runtime_host", ["venv"], indirect=True)

#: streamed chunks 50 ms apart: requests are in flight whenever the old server is drained
SLOW = {"FAKE_VLLM_TOKEN_DELAY": "0.05", "FAKE_VLLM_START_DELAY": "1"}


def test_args_change_with_room_fails_no_request_and_converges(env, capsys):
    models = {"m-z": {"model": "org/z", "port": 18411, "env": {**SLOW, "VLLM_CPU_KVCACHE_SPACE": "0"}}}
    env.write(models, api_port=18480)
    deploy_env(env.spec(), quiet=True)
    n = env.name
    with openai_load(f"http://{env.host.address}:18480", "m-z", clients=4) as load:
        for extra in (["--max-num-seqs", "8"], ["--max-num-seqs", "16"]):
            models["m-z"]["extra_args"] = extra
            env.write(models, api_port=18480)
            (result,) = deploy_env(env.spec(), service="vllm")
            assert result.status == "deployed"
    assert load.failures == [] and load.ok > 20 and load.streamed > 5
    out = capsys.readouterr().out
    assert "beside" in out and "drained and stopped" in out
    assert set(env.running()) == {f"albert-{n}-vllm-m-z", f"albert-{n}-api", f"albert-{n}-api-blue"}
    # converged: the same config again changes nothing
    (again,) = deploy_env(env.spec(), service="vllm", quiet=True)
    assert again.status == "unchanged"


def test_args_change_without_room_fails_only_with_503_and_retry_after(env, capsys):
    models = {"m-y": {"model": "org/y", "port": 18412,
                      "env": {**SLOW, "VLLM_CPU_KVCACHE_SPACE": "100000"}}}
    env.write(models, api_port=18481)
    deploy_env(env.spec(), quiet=True)
    with openai_load(f"http://{env.host.address}:18481", "m-y", clients=4) as load:
        models["m-y"]["extra_args"] = ["--max-num-seqs", "8"]
        env.write(models, api_port=18481)
        (result,) = deploy_env(env.spec(), service="vllm")
        assert result.status == "deployed"
    assert "no room on host" in capsys.readouterr().out
    assert load.ok > 10
    assert load.failures and {f for f in load.failures if f[0] != 503 or not f[1]} == set()
    assert set(env.running()) >= {f"albert-{env.name}-vllm-m-y"}
