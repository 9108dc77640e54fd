"""A model split over a host group becomes units (issue 17): a Ray node on every host of the
group, the head first, then vLLM on the head with the Ray executor; both runtimes; the dry-run
shows them; a rollback rebuilds a node's readiness from the manifest."""

from __future__ import annotations

import shlex

import pytest

from pyalbert.commands import ray
from pyalbert.config import load_spec
from pyalbert.engine.host_plans import deploy_plans, manifest, units_from_manifest
from pyalbert.runtimes import DockerRuntime
from pyalbert.runtimes.base import DeployInputs, Unit
from pyalbert.runtimes.checks import PortFree
from pyalbert.runtimes.venv import VenvRuntime

ENV = """
runtime = "{runtime}"
storage_dir = "/data/models"
placement = {{ "llama" = {{ group = "ab" }} }}

[deploy]
base_dir = "/srv/albert"

[vllm]
python = "/opt/vllm/bin/python"

[ray]
interface = "priv0"

[ray.ports]
gcs = 46379

[groups.ab]
hosts = ["gpu-a", "gpu-b"]

[[hosts]]
name = "gpu-a"
address = "10.0.0.1"
private_address = "10.1.0.1"
gpus = 2

[[hosts]]
name = "gpu-b"
address = "10.0.0.2"
private_address = "10.1.0.2"
gpus = 2
services = ["vllm"]
"""

LLAMA = {"model": "meta/llama", "port": 8001, "tensor_parallel_size": 2,
         "pipeline_parallel_size": 2, "gpu_mem_use": 0.9}


def plans(config_factory, runtime: str, **kw):
    config_factory.env(ENV.format(runtime=runtime))
    config_factory.routing({"llama": LLAMA})
    spec = load_spec("test", config_factory.root)
    kw.setdefault("service", "vllm")  # the api's units are another test's
    inputs = DeployInputs(release_id="20260101-000000-abcdef", secrets={}, config_files={}, **kw)
    return {hp.host.name: hp for hp in deploy_plans(spec.placement, inputs)}


def units(hp) -> list[Unit]:
    return [u for u in hp.units if isinstance(u, Unit)]


def test_venv_units_head_then_vllm_worker_alone(config_factory):
    hps = plans(config_factory, "venv")
    head, worker = hps["gpu-a"], hps["gpu-b"]
    assert [(u.name, u.service) for u in units(head)] == [
        ("albert-test-ray-ab", "ray"), ("albert-test-vllm-llama", "vllm")]
    assert [(u.name, u.service) for u in worker.units] == [("albert-test-ray-ab", "ray")]
    node = units(head)[0]
    argv = shlex.split(node.start.render().split(" -- ", 1)[1])
    assert argv == [
        "sh", "-c", 'rm -f -- "$0"; exec "$@"', "/tmp/ray-test-gpu-a/ray_current_cluster",
        "env", "VLLM_HOST_IP=10.1.0.1", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0",
        "GLOO_SOCKET_IFNAME=priv0", "NCCL_SOCKET_IFNAME=priv0",
        "/opt/vllm/bin/ray", "start", "--head", "--port", "46379",
        "--ray-client-server-port", "10001", "--include-dashboard", "false",
        "--node-ip-address", "10.1.0.1", "--object-manager-port", "8076",
        "--node-manager-port", "8077", "--runtime-env-agent-port", "8078",
        "--dashboard-agent-grpc-port", "8079", "--dashboard-agent-listen-port", "52365",
        "--metrics-export-port", "8085", "--min-worker-port", "10002",
        "--max-worker-port", "10100", "--num-gpus", "2", "--temp-dir", "/tmp/ray-test-gpu-a",
        "--disable-usage-stats", "--block"]
    worker_argv = shlex.split(worker.units[0].start.render().split(" -- ", 1)[1])
    assert worker_argv[5:9] == ["/opt/vllm/bin/ray", "start", "--address", "10.1.0.1:46379"]
    assert "--head" not in worker_argv and "--temp-dir" in worker_argv
    # both nodes are ready when the head lists the two
    assert node.ready == ray.ClusterReady("10.1.0.1:46379", 2, ("/opt/vllm/bin/ray",))
    assert worker.units[0].ready == node.ready


def test_venv_vllm_on_the_head_has_the_ray_executor_and_environment(config_factory):
    head = plans(config_factory, "venv")["gpu-a"]
    vllm = units(head)[1]
    argv = vllm.start.render()
    assert ("--tensor-parallel-size 2 --gpu-memory-utilization 0.9 --pipeline-parallel-size 2 "
            "--distributed-executor-backend ray") in argv
    env_file = next(f for f in head.files if f.path.endswith("albert-test-vllm-llama.env"))
    assert "RAY_ADDRESS=10.1.0.1:46379" in env_file.content
    assert "VLLM_HOST_IP=10.1.0.1" in env_file.content
    assert "GLOO_SOCKET_IFNAME=priv0" in env_file.content
    assert "CUDA_VISIBLE_DEVICES=0,1" in env_file.content


def test_ray_ports_are_preflight_checked_on_each_host(config_factory):
    hps = plans(config_factory, "venv")
    head_ports = {c.port for c in hps["gpu-a"].checks if isinstance(c, PortFree)}
    worker_ports = {c.port for c in hps["gpu-b"].checks if isinstance(c, PortFree)}
    assert {46379, 8076, 8077, 8078, 8079, 52365, 8085} <= head_ports
    assert 46379 not in worker_ports and {8076, 8077} <= worker_ports


def test_docker_nodes_are_containers_of_the_vllm_image_on_the_hosts_network(config_factory):
    hps = plans(config_factory, "docker")
    node = units(hps["gpu-b"])[0]
    text = node.start.render()
    assert text.startswith("docker run -d --name albert-test-ray-ab --restart unless-stopped "
                           "--ipc=host --network host -v /data/models/llama:/models/llama:ro "
                           "-v /tmp/ray-test-gpu-b:/tmp/ray-test-gpu-b --gpus '\"device=0,1\"'")
    assert "--entrypoint env vllm/vllm-openai:v0.6.3 VLLM_HOST_IP=10.1.0.2" in text
    assert "ray start --address 10.1.0.1:46379" in text
    assert node.ready == ray.ClusterReady("10.1.0.1:46379", 2,
                                          ("docker", "exec", "albert-test-ray-ab", "ray"))
    vllm = units(hps["gpu-a"])[2].start.render()
    assert "--network host" in vllm and " -p 127.0.0.1" not in vllm
    assert "--host 127.0.0.1" in vllm and "--distributed-executor-backend ray" in vllm


def test_docker_vllm_on_the_head_is_a_driver_of_the_head_node(config_factory):
    """Ray's driver finds its node's raylet among the processes it sees and talks to it over
    unix sockets in the node's session folder: the server's container shares both with the
    head's node container (else ray.init: 'No node info found matching attributes')."""
    hps = plans(config_factory, "docker")
    _, node, vllm = (u.start.render() for u in units(hps["gpu-a"]))
    session = "-v /tmp/ray-test-gpu-a:/tmp/ray-test-gpu-a "
    assert session in node and "--temp-dir /tmp/ray-test-gpu-a " in node
    assert session in vllm


def test_docker_head_node_and_vllm_join_the_groups_pid_namespace_holder(config_factory):
    """The head's PID namespace is held by a container of its own, started before the node, and
    both the node and the server join it: a crashed node restarts into it and so does the server
    (joined to the node itself, the server could never be restarted: issue 17). A worker's node
    keeps its own namespace."""
    hps = plans(config_factory, "docker")
    head, worker = units(hps["gpu-a"]), units(hps["gpu-b"])
    assert [(u.name, u.service) for u in head] == [
        ("albert-test-ray-ab-pid", "ray-pid"), ("albert-test-ray-ab", "ray"),
        ("albert-test-vllm-llama", "vllm")]
    holder, node, vllm = head
    assert holder.start.render() == (
        "docker run -d --name albert-test-ray-ab-pid --restart unless-stopped --init "
        "--network none --label albert.env=test --label albert.service=ray-pid "
        "--label albert.model=llama --label albert.release=20260101-000000-abcdef "
        f"--label albert.config-hash={holder.config_hash} --entrypoint sleep "
        "vllm/vllm-openai:v0.6.3 infinity")
    assert holder.ready is None and holder.stop.render().startswith("{ docker stop -t 5 ")
    for joined in (node, vllm):
        assert " --pid container:albert-test-ray-ab-pid " in joined.start.render()
    assert [u.name for u in worker] == ["albert-test-ray-ab"]
    assert "--pid" not in worker[0].start.render()


def test_only_a_new_holder_restarts_the_holder_and_a_new_holder_restarts_node_and_server(
        config_factory):
    """A change of the node or the server keeps the holder (restarting it would kill both); a new
    image is a new holder, and then a new node and server (they joined the old one)."""
    before = {u.name: u.config_hash for u in units(plans(config_factory, "docker")["gpu-a"])}
    config_factory.env(ENV.format(runtime="docker").replace('interface = "priv0"', 'num_cpus = 4'))
    spec = load_spec("test", config_factory.root)
    hp = deploy_plans(spec.placement, DeployInputs(release_id="r2", service="vllm"))[0]
    changed = {u.name for u in units(hp) if before[u.name] != u.config_hash}
    assert changed == {"albert-test-ray-ab", "albert-test-vllm-llama"}
    config_factory.env(ENV.format(runtime="docker").replace(
        "[deploy]", '[images]\nvllm = "vllm/vllm-openai:v0.7.0"\n\n[deploy]'))
    spec = load_spec("test", config_factory.root)
    hp = deploy_plans(spec.placement, DeployInputs(release_id="r3", service="vllm"))[0]
    assert all(before[u.name] != u.config_hash for u in units(hp))


def test_the_holder_is_recorded_ready_once_started_and_is_removed_after_what_joined_it(
        config_factory):
    from pyalbert.engine.host_plans import orphans

    hp = plans(config_factory, "docker", service="all")["gpu-a"]
    doc = manifest(hp, {}, who="t", when="now", previous=None)
    holder = units_from_manifest(doc, DockerRuntime())[0]
    assert holder.name == "albert-test-ray-ab-pid" and holder.ready is None
    assert holder.start.render() == hp.units[0].start.render()
    running = [{"name": "albert-test-ray-old-pid", "service": "ray-pid"},
               {"name": "albert-test-ray-old", "service": "ray"},
               {"name": "albert-test-vllm-old", "service": "vllm"},
               {"name": "albert-test-ray-ab-pid", "service": "ray-pid"}]
    assert orphans(running, hp) == ["albert-test-ray-old", "albert-test-vllm-old",
                                    "albert-test-ray-old-pid"]


def test_docker_model_on_one_host_keeps_its_own_pid_namespace(config_factory):
    config_factory.env(ENV.format(runtime="docker").replace(
        'placement = { "llama" = { group = "ab" } }', ""))
    config_factory.routing({"llama": {**LLAMA, "pipeline_parallel_size": 1}})
    spec = load_spec("test", config_factory.root)
    hp = deploy_plans(spec.placement, DeployInputs(release_id="r", service="vllm"))[0]
    [vllm] = [u for u in hp.units if u.service == "vllm"]
    assert "--pid" not in vllm.start.render() and "/tmp/ray-" not in vllm.start.render()


def test_a_model_deploy_takes_every_host_of_its_group(config_factory):
    hps = plans(config_factory, "venv", model="llama", service="all")
    assert sorted(hps) == ["gpu-a", "gpu-b"]  # every host of the group is locked
    assert [u.name for u in hps["gpu-b"].units] == ["albert-test-ray-ab"]


def test_manifest_records_a_nodes_readiness_for_rollback(config_factory):
    hp = plans(config_factory, "venv")["gpu-b"]
    doc = manifest(hp, {}, who="t", when="now", previous=None)
    [entry] = doc["units"]
    assert entry["ready_ray"] == {"address": "10.1.0.1:46379", "nodes": 2,
                                  "ray": ["/opt/vllm/bin/ray"]}
    [unit] = units_from_manifest(doc, VenvRuntime(load_spec("test", config_factory.root).env))
    assert unit.ready == hp.units[0].ready


def test_the_head_config_change_restarts_vllm_too(config_factory):
    """vLLM is a driver of the head's cluster: a new head means a new server."""
    before = units(plans(config_factory, "venv")["gpu-a"])[1].config_hash
    config_factory.env(ENV.format(runtime="venv").replace('interface = "priv0"', 'num_cpus = 4'))
    spec = load_spec("test", config_factory.root)
    hp = deploy_plans(spec.placement, DeployInputs(release_id="r", service="vllm"))[0]
    assert units(hp)[1].config_hash != before


@pytest.mark.parametrize("runtime", ["venv", "docker"])
def test_dry_run_shows_the_nodes_before_vllm(config_factory, runtime):
    from pyalbert.engine.context import RunContext
    from pyalbert.engine.operations import dry_run_commands

    hps = plans(config_factory, runtime)
    shown = {h: [c.display() for c in cmds] for h, cmds in
             dry_run_commands(list(hps.values()), RunContext(who="t")).items()}
    head = "\n".join(shown["gpu-a"])
    assert head.index("ray start --head") < head.index("--distributed-executor-backend ray")
    assert "ray status --address 10.1.0.1:46379 -v" in head
    assert "ray start --address 10.1.0.1:46379" in "\n".join(shown["gpu-b"])
    assert isinstance(DockerRuntime().ray_bin(load_spec("test", config_factory.root).env), str)
