"""Ray cluster builders (issue 17): whole command strings, ports, the split's checks, ray status."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pyalbert.commands import ray, vllm
from pyalbert.config.ray_ports import RayPortsSpec
from pyalbert.config.routing import ModelSpec

#: the config's defaults
PORTS = RayPortsSpec()

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ray"
GiB = 2**30


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- ray start / stop / status: whole strings ----------------------------------------------------


def test_start_head_whole_string():
    cmd = ray.start_head("10.0.0.1", PORTS, ray="/opt/albert/ray-venv/bin/ray", num_gpus=8, block=True,
                         interface="ens5")
    assert cmd.render() == (
        "env VLLM_HOST_IP=10.0.0.1 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 "
        "GLOO_SOCKET_IFNAME=ens5 NCCL_SOCKET_IFNAME=ens5 "
        "/opt/albert/ray-venv/bin/ray start --head --port 6379 --ray-client-server-port 10001 "
        "--include-dashboard false --node-ip-address 10.0.0.1 --object-manager-port 8076 "
        "--node-manager-port 8077 --runtime-env-agent-port 8078 --dashboard-agent-grpc-port 8079 "
        "--dashboard-agent-listen-port 52365 --metrics-export-port 8085 --min-worker-port 10002 "
        "--max-worker-port 10100 --num-gpus 8 --disable-usage-stats --block")


def test_start_worker_whole_string():
    ports = RayPortsSpec(gcs=7000, object_manager=7001, node_manager=7002, runtime_env_agent=7003,
                         dashboard_agent_grpc=7004, dashboard_agent_listen=7005,
                         metrics_export=7006, min_worker=7100, max_worker=7199)
    cmd = ray.start_worker(ray.head_address("10.0.0.1", ports), "10.0.0.2", ports, num_cpus=4,
                           temp_dir="/data/albert/ray")
    assert cmd.render() == (
        "env VLLM_HOST_IP=10.0.0.2 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 "
        "ray start --address 10.0.0.1:7000 --node-ip-address 10.0.0.2 "
        "--object-manager-port 7001 --node-manager-port 7002 --runtime-env-agent-port 7003 "
        "--dashboard-agent-grpc-port 7004 --dashboard-agent-listen-port 7005 "
        "--metrics-export-port 7006 --min-worker-port 7100 --max-worker-port 7199 --num-cpus 4 "
        "--temp-dir /data/albert/ray --disable-usage-stats")


def test_a_head_starts_without_the_last_starts_address_file():
    """A restarting head would otherwise refuse when another raylet names its address."""
    cmd = ray.forgetting_last_cluster(ray.start_head("10.0.0.1", PORTS, temp_dir="/tmp/ray-a"),
                                      "/tmp/ray-a")
    assert cmd.render().startswith(
        "sh -c 'rm -f -- \"$0\"; exec \"$@\"' /tmp/ray-a/ray_current_cluster "
        "env VLLM_HOST_IP=10.0.0.1 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 "
        "ray start --head --port 6379 ")


def test_dashboard_is_bound_to_the_private_address_never_all_interfaces():
    argv = shlex.split(ray.start_head("10.0.0.1", PORTS, dashboard=True).render())
    i = argv.index("--include-dashboard")
    assert argv[i:i + 6] == ["--include-dashboard", "true", "--dashboard-host", "10.0.0.1",
                             "--dashboard-port", "8265"]
    assert "0.0.0.0" not in argv


@pytest.mark.parametrize("builder", [
    lambda: ray.start_head("10.0.0.1", PORTS),
    lambda: ray.start_worker("10.0.0.1:6379", "10.0.0.2", PORTS),
], ids=["head", "worker"])
def test_every_listening_port_is_pinned(builder):
    """Ray picks random ports for any it is not given: a firewall could not open exactly them."""
    argv = shlex.split(builder().render())
    for flag in ("--object-manager-port", "--node-manager-port", "--runtime-env-agent-port",
                 "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
                 "--metrics-export-port", "--min-worker-port", "--max-worker-port"):
        assert argv[argv.index(flag) + 1].isdigit(), flag
        assert argv[argv.index(flag) + 1] != "0", flag


@pytest.mark.parametrize("kwargs, present, absent", [
    ({}, [], ["--block", "--num-cpus", "--num-gpus", "--temp-dir", "GLOO_SOCKET_IFNAME"]),
    ({"block": True}, ["--block"], []),
    ({"num_gpus": 0}, ["--num-gpus 0"], ["--num-cpus"]),
    ({"num_cpus": 2, "num_gpus": 1}, ["--num-cpus 2 --num-gpus 1"], []),
    ({"interface": "eth1"}, ["GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1"], []),
], ids=["defaults", "block", "zero-gpus-kept", "cpus-and-gpus", "interface"])
def test_worker_options(kwargs, present, absent):
    text = ray.start_worker("10.0.0.1:6379", "10.0.0.2", PORTS, **kwargs).render()
    for part in present:
        assert part in text
    for part in absent:
        assert part not in text


def test_worker_never_says_head_or_gcs_port_and_head_never_says_address():
    worker = shlex.split(ray.start_worker("10.0.0.1:6379", "10.0.0.2", PORTS).render())
    head = shlex.split(ray.start_head("10.0.0.1", PORTS).render())
    assert "--head" not in worker and "--port" not in worker
    assert "--ray-client-server-port" not in worker
    assert "--address" not in head


@pytest.mark.parametrize("kwargs, expected", [
    ({}, "ray stop"),
    ({"force": True}, "ray stop --force"),
    ({"grace_period": 30}, "ray stop --grace-period 30"),
    ({"ray": "/v/bin/ray", "force": True, "grace_period": 0}, "/v/bin/ray stop --force --grace-period 0"),
], ids=["plain", "force", "grace", "path-force-grace0"])
def test_stop(kwargs, expected):
    assert ray.stop(**kwargs).render() == expected


def test_status_is_verbose_for_the_per_node_breakdown():
    assert ray.status("10.0.0.1:6379", ray="/v/bin/ray").render() == (
        "/v/bin/ray status --address 10.0.0.1:6379 -v")


def test_node_ip_is_quoted_not_interpreted():
    text = ray.start_worker("10.0.0.1:6379", "10.0.0.2; reboot", PORTS).render()
    assert "'VLLM_HOST_IP=10.0.0.2; reboot'" in text and "'10.0.0.2; reboot'" in text


# --- ports ---------------------------------------------------------------------------------------


def test_firewall_opens_gcs_on_the_head_only_and_never_client_or_dashboard():
    ports = RayPortsSpec()
    head, worker = ports.between_nodes(head=True), ports.between_nodes(head=False)
    assert head == [6379, 8076, 8077, 8078, 8079, 8085, 52365, (10002, 10100)]
    assert worker == head[1:]
    assert ports.client_server not in head and ports.dashboard not in head


@pytest.mark.parametrize("ports, fragment", [
    (RayPortsSpec(node_manager=8076), "object_manager and node_manager are both 8076"),
    (RayPortsSpec(min_worker=9000, max_worker=8000), "min_worker = 9000 > max_worker = 8000"),
    (RayPortsSpec(metrics_export=10050), "metrics_export = 10050 is inside the worker range"),
    (RayPortsSpec(gcs=80), "gcs = 80 is outside 1024-65535"),
    (RayPortsSpec(gcs=70000), "gcs = 70000 is outside"),
], ids=["duplicate", "range-reversed", "inside-range", "privileged", "too-high"])
def test_port_problems_name_the_field(ports, fragment):
    assert any(fragment in p for p in ports.problems()), ports.problems()


def test_default_ports_have_no_problem():
    assert RayPortsSpec().problems() == []


@pytest.mark.parametrize("others, fragment", [
    ({"port of llama-405b": 8265}, "port of llama-405b = 8265 clashes with ray port dashboard"),
    ({"port of m": 6379}, "clashes with ray port gcs"),
    ({"port of m": 8077}, "clashes with ray port node-manager"),
    ({"port of m": 10050}, "inside the ray worker range 10002-10100"),
], ids=["dashboard", "gcs", "node-manager", "worker-range"])
def test_vllm_port_clashing_with_ray(others, fragment):
    problems = RayPortsSpec().clashes_with(others)
    assert len(problems) == 1 and fragment in problems[0]


def test_vllm_port_apart_from_ray_is_fine():
    assert RayPortsSpec().clashes_with({"port of m": 8001}) == []


# --- vLLM across the group -----------------------------------------------------------------------


def test_multinode_args_whole_list_added_to_server_args():
    model = ModelSpec(model="meta-llama/Llama-3.1-405B-Instruct", port=8001,
                      tensor_parallel_size=8)
    args = vllm.server_args("llama-405b", model, model_path="/data/models/llama-405b") + \
        ray.vllm_multinode_args(2)
    assert shlex.join(args) == (
        "--host 0.0.0.0 --port 8001 --model /data/models/llama-405b --served-model-name llama-405b "
        "--tensor-parallel-size 8 --gpu-memory-utilization 0.9 "
        "--pipeline-parallel-size 2 --distributed-executor-backend ray")


@pytest.mark.parametrize("pp, tp, expected", [
    (2, None, ["--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray"]),
    (4, 2, ["--pipeline-parallel-size", "4", "--tensor-parallel-size", "2",
            "--distributed-executor-backend", "ray"]),
    (1, 8, ["--pipeline-parallel-size", "1", "--tensor-parallel-size", "8",
            "--distributed-executor-backend", "ray"]),
], ids=["pp2", "pp4-tp2", "tp-only"])
def test_multinode_args(pp, tp, expected):
    assert ray.vllm_multinode_args(pp, tp) == expected


@pytest.mark.parametrize("pp, tp", [(0, None), (2, 0), (-1, 1)], ids=["pp0", "tp0", "negative"])
def test_multinode_args_refuse_sizes_below_one(pp, tp):
    with pytest.raises(ValueError, match="must be >= 1"):
        ray.vllm_multinode_args(pp, tp)


def test_vllm_env_joins_the_group_cluster():
    assert ray.vllm_env("10.0.0.1", RayPortsSpec(gcs=7000)) == {
        "RAY_ADDRESS": "10.0.0.1:7000", "VLLM_HOST_IP": "10.0.0.1"}


@pytest.mark.parametrize("pp, tp, gpus, layers, fragments", [
    (2, 8, [8, 8], 126, []),
    (2, 4, [4, 4], None, []),
    (2, 8, [8, 4], None, ["8 x 2 = 16, but the group's 2 hosts give 12 GPUs",
                          "more than the 4 GPUs of host 2"]),
    (3, 8, [8, 8], None, ["8 x 3 = 24, but the group's 2 hosts give 16 GPUs"]),
    (1, 16, [8, 8], None, ["tensor_parallel_size = 16 is more than the 8 GPUs of host 1"]),
    (4, 1, [2, 2], 2, ["pipeline_parallel_size = 4 is more than the model's 2 layers"]),
    (0, 1, [1], None, ["must both be >= 1"]),
], ids=["405b-2x8", "2x4", "mismatch-and-small-host", "pp-too-big", "tp-spans-hosts",
        "pp-over-layers", "zero"])
def test_parallel_problems(pp, tp, gpus, layers, fragments):
    problems = ray.parallel_problems(pipeline_parallel_size=pp, tensor_parallel_size=tp,
                                     gpus_per_host=gpus, num_layers=layers)
    assert len(problems) == len(fragments), problems
    for fragment, problem in zip(fragments, problems, strict=True):
        assert fragment in problem


# --- the ray status fact, on real output ---------------------------------------------------------


def test_parse_one_node_status_of_the_spike():
    status = ray.parse_status(fixture("status-2.60-one-node.txt"))
    assert [n.node_id for n in status.nodes] == [
        "8681d1e2dc8fb6f8d54ce3ed1e4599c2fcb09e3698d8224ba6c7d922"]
    assert status.nodes[0].state == "active"
    assert status.nodes[0].resources == {}  # no -v: totals only
    assert status.cpus == 4.0 and status.gpus == 0.0
    assert status.total["memory"].total == pytest.approx(16.01 * GiB)
    assert status.total["object_store_memory"] == ray.Usage(0.0, pytest.approx(6.86 * GiB))
    assert status.pending == () and status.failures == () and status.demands == ()


@pytest.mark.parametrize("text", ["", "Error: could not connect to GCS", "Node status\n"],
                         ids=["empty", "error", "truncated"])
def test_parse_refuses_what_is_not_ray_status(text):
    with pytest.raises(ray.RayStatusError):
        ray.parse_status(text)


def test_usage_lines():
    text = fixture("status-2.60-one-node.txt").replace(
        " 0.0/4.0 CPU", " 1.5/4.0 CPU\n 2.0/8.0 GPU\n 0.0/1.0 accelerator_type:A100 (x)")
    status = ray.parse_status(text)
    assert status.total["CPU"] == ray.Usage(1.5, 4.0)
    assert status.gpus == 8.0
    assert status.total["accelerator_type:A100"] == ray.Usage(0.0, 1.0)


def test_unknown_node_line_is_an_error_not_a_silent_miss():
    text = fixture("status-2.60-one-node.txt").replace(
        " 1 node_8681d1e2dc8fb6f8d54ce3ed1e4599c2fcb09e3698d8224ba6c7d922", " 1 gpu-worker-type")
    with pytest.raises(ray.RayStatusError, match="gpu-worker-type"):
        ray.parse_status(text)


def test_a_head_still_starting_has_no_status_yet_rather_than_an_error():
    assert ray.parse_status(fixture("status-2.60-starting.txt")) is None


def test_parse_two_node_verbose_status_of_the_integration_test():
    """Real ``ray status -v`` of tests/integration/test_ray_cluster.py: head 1 CPU, worker 2."""
    status = ray.parse_status(fixture("status-2.60-two-nodes-verbose.txt"))
    head, worker = "3d0eeae442fc41b6d4cd6d9a3ee6f2c72ab62a301cc571a366ab6a7b", \
        "8c2846da83f8935ed8c96d0d04cfb7b7e2aad107915a01a7d4a26e30"
    assert [(n.node_id, n.state, n.cpus) for n in status.nodes] == [
        (head, "active", 1.0), (worker, "active", 2.0)]
    assert status.node(worker).resources == {
        "CPU": ray.Usage(0.0, 2.0),
        "memory": ray.Usage(0.0, pytest.approx(15.62 * GiB)),
        "object_store_memory": ray.Usage(0.0, pytest.approx(6.69 * GiB)),
    }
    assert status.cpus == 3.0 and status.node("nope") is None
    assert status.pending == () and status.failures == () and status.demands == ()


def test_a_busy_node_and_a_lost_one():
    text = fixture("status-2.60-two-nodes-verbose.txt")
    text = text.replace("  0.0/2.0 CPU", "  2.0/2.0 CPU").replace(
        " (no failures)", " node_8c2846da: NodeTerminated (ip: 10.211.100.2)").replace(
        " (no resource demands)", " {'CPU': 1.0}: 1+ pending tasks/actors")
    status = ray.parse_status(text)
    assert status.nodes[1].resources["CPU"] == ray.Usage(2.0, 2.0)
    assert status.failures == ("node_8c2846da: NodeTerminated (ip: 10.211.100.2)",)
    assert status.demands == ("{'CPU': 1.0}: 1+ pending tasks/actors",)


def test_the_builders_ports_are_the_configs():
    """One source of the ports and their defaults: the config's ``[ray.ports]``."""
    from pyalbert.config.environment import RaySpec

    assert RaySpec().ports == PORTS
    assert not hasattr(ray, "RayPorts")
    assert "--metrics-export-port 8085" in ray.start_head("10.0.0.1", PORTS).render()  # not 8080
