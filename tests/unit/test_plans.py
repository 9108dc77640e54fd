"""Plans are data: a config and inputs in, host plans (checks, files, units) out."""

from __future__ import annotations

import json

import pytest

from pyalbert.commands.base import Cmd
from pyalbert.config import load_spec, resolve_placement
from pyalbert.engine.host_plans import deploy_plans, manifest, orphans, units_from_manifest
from pyalbert.errors import AlbertError
from pyalbert.runtimes import DockerRuntime, runtime_for
from pyalbert.runtimes.base import ApiSwap, DeployInputs, Unit
from pyalbert.runtimes.checks import DiskFree, DockerAnswers, ModelPresent, PortFree

TWO_HOSTS = """
    [deploy]
    base_dir = "/srv/albert"
    ready_timeout_s = 30

    [[hosts]]
    name = "gpu-1"
    address = "10.0.0.1"
    gpus = 2

    [[hosts]]
    name = "cpu-1"
    address = "10.0.0.2"
    services = ["api"]
"""


@pytest.fixture
def plan(config_factory):
    config_factory.env(TWO_HOSTS)
    config_factory.routing({
        "small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4,
                  "env": {"VLLM_X": "1"}},
        "big": {"model": "org/big", "port": 8002, "tensor_parallel_size": 2, "gpu_mem_use": 0.5},
    })
    return resolve_placement(load_spec("test", config_factory.root))


def inputs(**kw):
    base = dict(release_id="20250101-000000-abcdef", secrets={"hf_token": "hf_top_secret"},
                config_files={"environments/test.toml": "x", "llm_routing_table.json": "{}"})
    return DeployInputs(**{**base, **kw})


def test_one_host_plan_per_host_vllm_first_then_api(plan):
    hps = deploy_plans(plan, inputs())
    assert [hp.host.name for hp in hps] == ["gpu-1", "cpu-1"]
    gpu, cpu = hps
    assert [u.name for u in gpu.units if isinstance(u, Unit)] == [
        "albert-test-vllm-small", "albert-test-vllm-big"]
    assert isinstance(gpu.units[-1], ApiSwap)  # default services: vllm and api
    assert [type(u).__name__ for u in cpu.units] == ["ApiSwap"]
    assert gpu.release_dir == "/srv/albert/releases/20250101-000000-abcdef"
    assert gpu.ready_timeout_s == 30


def test_vllm_unit_container_and_secret_env_file(plan):
    gpu = deploy_plans(plan, inputs())[0]
    big = gpu.units[1]
    assert big.start.render() == (
        "mkdir -p -m 0700 /data/models/.vllm-cache/docker-vllm-vllm-openai-v0.6.3 && "
        "docker run -d --name albert-test-vllm-big --restart unless-stopped --ipc=host "
        "-p 10.0.0.1:8002:8002 -v /data/models/big:/models/big:ro "
        "-v /data/models/.vllm-cache/docker-vllm-vllm-openai-v0.6.3:/vllm-cache "
        "--gpus '\"device=0,1\"' "
        "--env-file /srv/albert/releases/20250101-000000-abcdef/albert-test-vllm-big.env "
        "--label albert.env=test --label albert.service=vllm --label albert.model=big "
        "--label albert.release=20250101-000000-abcdef "
        f"--label albert.config-hash={big.config_hash} vllm/vllm-openai:v0.6.3 "
        "--host 0.0.0.0 --port 8002 --model /models/big --served-model-name big "
        "--tensor-parallel-size 2 --gpu-memory-utilization 0.5")
    assert "hf_top_secret" not in big.start.render()
    env_file = next(f for f in gpu.files if f.path.endswith("albert-test-vllm-small.env"))
    assert env_file.secret
    lines = [ln for ln in env_file.content.splitlines() if not ln.startswith("#")]
    assert lines == ["HF_TOKEN=hf_top_secret", "HUGGING_FACE_HUB_TOKEN=hf_top_secret",
                     "TORCHINDUCTOR_CACHE_DIR=/vllm-cache/torchinductor",
                     "TRITON_CACHE_DIR=/vllm-cache/triton", "VLLM_CACHE_ROOT=/vllm-cache",
                     "VLLM_USE_AOT_COMPILE=0", "VLLM_X=1"]
    assert "hf_top_secret" not in env_file.cmd().display()
    assert big.ready.model == "big" and big.ready.port == 8002


def test_config_hash_ignores_release_id_and_follows_config(plan):
    a = deploy_plans(plan, inputs())[0].units[0]
    b = deploy_plans(plan, inputs(release_id="20250202-000000-ffffff"))[0].units[0]
    c = deploy_plans(plan, inputs(secrets={"hf_token": "other"}))[0].units[0]
    assert a.config_hash == b.config_hash
    assert a.config_hash != c.config_hash
    assert a.start.render() != b.start.render()  # labels and env file name the release


def test_api_swap_colours_edge_and_files(plan):
    cpu = deploy_plans(plan, inputs(secrets={"api_keys": '{"k": 1}'}))[1]
    swap = cpu.units[0]
    blue, green = swap.colours["blue"], swap.colours["green"]
    assert (blue.port, green.port) == (24160, 24161)
    run = blue.start.render().split(" && ", 1)[1]
    assert "--network host" in run and " -p " not in run  # no port published
    assert "--entrypoint albert" in blue.start.render()
    assert blue.start.render().endswith(
        "api --env test --config-dir /etc/albert/config --backends /etc/albert/backends.json "
        "--keys /etc/albert/keys.json --routes /etc/albert-routes --host 127.0.0.1 --port 24160 "
        "--uds /srv/albert/edge-test/sockets/blue.sock --workers 1")
    # the colours' socket folder: made by the deploy user, mounted at the same path (the edge
    # container mounts the whole edge folder)
    assert blue.start.render().startswith("mkdir -p /srv/albert/edge-test/sockets && docker run")
    assert "-v /srv/albert/edge-test/sockets:/srv/albert/edge-test/sockets " in blue.start.render()
    assert "--uds /srv/albert/edge-test/sockets/green.sock" in green.start.render()
    assert blue.config_hash == green.config_hash
    assert swap.edge.name == "albert-test-api"
    assert "--network host" in swap.edge.start.render()
    assert swap.edge.start.render().endswith(
        "--entrypoint haproxy --user \"$(id -u):$(id -g)\" haproxy:2.6 -W -db -f "
        "/srv/albert/edge-test/config/haproxy.cfg")
    # the switch: HAProxy's runtime API (new colour ready, the old one drains), state saved
    assert swap.switch("green").tokens[3:] == (
        "/srv/albert/edge-test/haproxy.sock",
        "set server api/green state ready; set server api/green health up; set server api/blue state maint",
        "/srv/albert/edge-test/servers.state", "/srv/albert/edge-test/upstream", "24161")
    assert [c.what for c in swap.checks] == ["haproxy -c accepts the front door's config and certificate"]
    files = {f.path.rsplit("/releases/20250101-000000-abcdef/", 1)[-1]: f for f in cpu.files}
    assert set(files) == {"backends.json", "keys.json", "config/environments/test.toml",
                          "config/llm_routing_table.json", "/srv/albert/routes-test/README",
                          "edge/haproxy.cfg", "edge/edge.sha"}
    assert ("server green unix@/srv/albert/edge-test/sockets/green.sock check"
            in files["edge/haproxy.cfg"].content)
    assert files["keys.json"].secret and not files["backends.json"].secret
    assert json.loads(files["backends.json"].content) == {
        "small": ["http://10.0.0.1:8001"], "big": ["http://10.0.0.1:8002"]}


def test_service_and_model_filters(plan):
    only_vllm = deploy_plans(plan, inputs(service="vllm"))
    assert [hp.host.name for hp in only_vllm] == ["gpu-1"]
    one = deploy_plans(plan, inputs(model="big"))
    assert [[u.name for u in hp.units] for hp in one] == [["albert-test-vllm-big"]]
    assert not one[0].remove_orphans
    with pytest.raises(AlbertError, match="--model 'nope' is not in the routing table"):
        deploy_plans(plan, inputs(model="nope"))


def test_checks_name_docker_disk_models_and_ports(plan):
    gpu = deploy_plans(plan, inputs())[0]
    assert gpu.checks == (
        DockerAnswers(), DiskFree("/srv/albert", 1024),
        ModelPresent("small", "/data/models/small"), *gpu.checks[3:4], PortFree(8001, "albert-test-vllm-small"),
        *gpu.checks[5:6],
        ModelPresent("big", "/data/models/big"), *gpu.checks[7:8], PortFree(8002, "albert-test-vllm-big"),
        *gpu.checks[9:11], PortFree(8080, "albert-test-api"))
    assert gpu.checks[10].what == "haproxy -c accepts the front door's config and certificate"
    # the routing table's arguments against each model's config.json (refused before a stop)
    assert [c.what for c in (gpu.checks[3], gpu.checks[7])] == [
        "small: arguments fit /data/models/small/config.json",
        "big: arguments fit /data/models/big/config.json"]
    # on a GPU host: the free GPU memory of the GPUs each server uses, and will it fit
    assert [c.what for c in (gpu.checks[5], gpu.checks[9])] == [
        "small: GPU memory on GPU(s) 0", "big: GPU memory on GPU(s) 0,1"]
    assert gpu.checks[5].units == ("albert-test-vllm-small", "albert-test-vllm-small-spare")
    assert [c.what for c in gpu.checks[:3]] == [
        "docker answers", "1024 MiB free under /srv/albert", "model small is in /data/models/small"]
    assert gpu.checks[2].cmd.render() == "test -e /data/models/small"


def test_manifest_round_trips_into_units_for_rollback(plan):
    hps = deploy_plans(plan, inputs())
    for hp in hps:
        doc = json.loads(json.dumps(manifest(hp, {}, who="ana", when="t", previous=None)))
        units = units_from_manifest(doc, DockerRuntime())
        assert [u.config_hash for u in units] == [u.config_hash for u in hp.units]
        for new, old in zip(units, hp.units, strict=True):
            if isinstance(old, Unit):
                assert new.start.render() == old.start.render() and new.name == old.name
                assert new.ready == old.ready
                probes = [u.warm_probe.render() if u.warm_probe else None for u in (new, old)]
                assert probes[0] == probes[1] and (old.service != "vllm" or probes[0])
            else:
                assert new.colours["green"].start.render() == old.colours["green"].start.render()
                assert new.upstream_file == old.upstream_file


def test_manifest_keeps_the_release_of_unchanged_units(plan):
    hp = deploy_plans(plan, inputs())[0]
    doc = manifest(hp, {"albert-test-vllm-small": "older"}, who="a", when="t", previous="older")
    assert [u["release"] for u in doc["units"]] == ["older"] + [hp.release_id] * 3
    assert doc["previous"] == "older" and doc["host"] == "gpu-1"


def test_orphans_are_containers_the_plan_no_longer_names(plan):
    hp = deploy_plans(plan, inputs())[0]
    running = [{"name": "albert-test-vllm-small"}, {"name": "albert-test-vllm-removed"}]
    assert orphans(running, hp) == ["albert-test-vllm-removed"]
    filtered = deploy_plans(plan, inputs(model="small"))[0]
    assert orphans(running, filtered) == []


def test_dry_run_is_the_engine_on_a_recorder_masks_secrets_and_ends_with_unlock(plan):
    from pyalbert.commands import lock
    from pyalbert.engine.context import RunContext
    from pyalbert.engine.operations import dry_run_commands

    hp = deploy_plans(plan, inputs())[0]
    cmds = dry_run_commands([hp], RunContext(who="ana@box"))["gpu-1"]
    shown = [c.display() for c in cmds]
    assert shown[0] == "docker version --format '{{.Server.Version}}'"
    assert shown[-1] == lock.release(hp.base_dir).display()
    text = "\n".join(shown)
    assert "hf_top_secret" not in text and "[secret," in text
    assert all(isinstance(c, Cmd) for c in cmds)
    # everything the plan starts is started, in order: vLLM servers, then the api's blue colour
    starts = [u.start.display() for u in hp.units if isinstance(u, Unit)]
    starts.append(next(u for u in hp.units if isinstance(u, ApiSwap)).colours["blue"].start.display())
    assert [s for s in shown if s in starts] == starts


def test_runtime_follows_the_environment(config_factory):
    from pyalbert.runtimes.venv import VenvRuntime

    config_factory.env('[[hosts]]\nname="h"\naddress="10.0.0.1"\n')
    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    assert isinstance(runtime_for(load_spec("test", config_factory.root).env), DockerRuntime)
    config_factory.env('runtime = "venv"\n[[hosts]]\nname="h"\naddress="10.0.0.1"\n')
    assert isinstance(runtime_for(load_spec("test", config_factory.root).env), VenvRuntime)


def test_production_api_needs_keys_development_runs_without(config_factory):
    from pyalbert.engine.host_plans import deploy_plans
    from pyalbert.runtimes.base import DeployInputs

    config_factory.routing({"m": {"model": "org/m", "port": 8001}})
    config_factory.env('tier = "production"\n[[hosts]]\nname="h"\naddress="10.0.0.1"\n')
    plan = resolve_placement(load_spec("test", config_factory.root))
    with pytest.raises(AlbertError, match="ALBERT_API_KEYS is not set"):
        deploy_plans(plan, DeployInputs(release_id="r1"))
    assert deploy_plans(plan, DeployInputs(release_id="r1", service="vllm"))  # vllm alone is fine
    config_factory.env('tier = "development"\n[[hosts]]\nname="h"\naddress="10.0.0.1"\n')
    plan = resolve_placement(load_spec("test", config_factory.root))
    (hp,) = deploy_plans(plan, DeployInputs(release_id="r1"))
    swap = next(u for u in hp.units if not hasattr(u, "model_id"))
    assert "--no-auth" in swap.colours["blue"].start.render()
