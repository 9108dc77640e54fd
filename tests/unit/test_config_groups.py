"""Host groups (issue 17): a model split over hosts is validated before any host is touched, and
every mistake names the file, the key and the fix."""

from __future__ import annotations

import json

import pytest

from pyalbert.config import load_spec
from pyalbert.errors import ConfigError
from pyalbert.runtimes.model_args import problems as args_problems

HOSTS = """
[[hosts]]
name = "gpu-a"
address = "10.0.0.1"
private_address = "10.1.0.1"
gpus = 8
gpu_memory_gb = 80
services = ["vllm", "api"]

[[hosts]]
name = "gpu-b"
address = "10.0.0.2"
private_address = "10.1.0.2"
gpus = 8
gpu_memory_gb = 80
services = ["vllm"]

[[hosts]]
name = "gpu-c"
address = "10.0.0.3"
gpus = 8
services = ["vllm"]
"""

GROUP = """
placement = { "llama-405b" = { group = "gpu-ab" } }

[groups.gpu-ab]
hosts = ["gpu-a", "gpu-b"]
"""

BIG = {"model": "meta/llama-405b", "port": 8001, "tensor_parallel_size": 8,
       "pipeline_parallel_size": 2}


def load(config_factory, env: str = GROUP, routing: dict | None = None, extra: str = ""):
    config_factory.env(env.replace("[groups", extra + "\n[groups", 1) + HOSTS if extra else
                       env + HOSTS)
    config_factory.routing(routing or {"llama-405b": BIG})
    return load_spec("test", config_factory.root)


def error_of(config_factory, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(config_factory, **kwargs)
    return str(info.value)


def test_a_split_model_runs_on_the_head_and_the_gateway_has_one_backend(config_factory):
    spec = load(config_factory)
    [inst] = spec.placement.vllm
    assert (inst.host.name, inst.gpu_ids) == ("gpu-a", tuple(range(8)))
    [group] = spec.placement.groups
    assert [h.name for h in group.hosts] == ["gpu-a", "gpu-b"]
    assert group.address == "10.1.0.1:6379"  # the head's private address
    assert group.unit_name() == "albert-test-ray-gpu-ab"
    # the gateway (on gpu-a only) reaches the head's server on loopback: one replica
    assert spec.placement.backends == {"llama-405b": ["http://127.0.0.1:8001"]}
    assert [g.name for g in spec.placement.groups_on("gpu-b")] == ["gpu-ab"]
    assert spec.placement.groups_on("gpu-c") == []


def test_tp_times_pp_must_equal_the_groups_gpus(config_factory):
    message = error_of(config_factory, routing={"llama-405b": {**BIG, "tensor_parallel_size": 4}})
    assert "llm_routing_table.json: key 'llama-405b.pipeline_parallel_size'" in message
    assert "4 x 2 = 8, but the group's 2 hosts give 16 GPUs" in message
    assert "group gpu-ab (gpu-a, gpu-b)" in message


def test_tp_wider_than_a_host_is_refused(config_factory):
    message = error_of(config_factory, routing={"llama-405b": {**BIG, "tensor_parallel_size": 16,
                                                               "pipeline_parallel_size": 1}})
    assert "a tensor-parallel group must fit one host" in message


def test_a_host_in_two_groups(config_factory):
    env = GROUP + '\n[groups.gpu-bc]\nhosts = ["gpu-b", "gpu-c"]\n'
    message = error_of(config_factory, env=env)
    assert "test.toml: key 'groups.gpu-bc.hosts': host gpu-b is already in group gpu-ab" in message
    assert "Fix: keep each host in one group" in message


def test_a_missing_host(config_factory):
    env = GROUP.replace('"gpu-b"]', '"gpu-z"]')
    message = error_of(config_factory, env=env)
    assert "key 'groups.gpu-ab.hosts': host(s) gpu-z are not in 'hosts'" in message


def test_an_unknown_group(config_factory):
    env = GROUP.replace('group = "gpu-ab"', 'group = "gpu-xy"')
    message = error_of(config_factory, env=env)
    assert "key 'placement.llama-405b.group': no group named 'gpu-xy' (groups: gpu-ab)" in message


def test_pipeline_parallel_without_a_group(config_factory):
    message = error_of(config_factory, env="")
    assert "key 'llama-405b.pipeline_parallel_size': is 2 but the model is not placed on a host " \
           "group" in message


def test_a_split_model_is_one_replica(config_factory):
    message = error_of(config_factory, routing={"llama-405b": {**BIG, "replicas": 2}})
    assert "key 'llama-405b.replicas'" in message and "set replicas = 1" in message


@pytest.mark.parametrize("ray, other, expected", [
    ("gcs = 8001", None, "port of model 'llama-405b' = 8001 clashes with ray port gcs"),
    ("node_manager = 8080", None, "api.port = 8080 clashes with ray port node-manager"),
    ("min_worker = 24000\nmax_worker = 25000", None,
     "the api's blue colour (from api.port) = 24160 is inside the ray worker range"),
    ("object_manager = 9090", "[metrics]\nenabled = true\n",
     "metrics.port = 9090 clashes with ray port object-manager"),
    ("object_manager = 6379", None, "ray ports gcs and object_manager are both 6379"),
], ids=["ray-vs-vllm", "ray-vs-api", "worker-range-vs-api-colour", "ray-vs-prometheus",
        "ray-vs-ray"])
def test_ports_clashing(config_factory, ray, other, expected):
    env = GROUP + (other or "") + f"\n[ray.ports]\n{ray}\n"
    message = error_of(config_factory, env=env)
    assert "test.toml: key 'ray.ports'" in message
    assert expected in message


def test_a_host_of_a_group_must_run_vllm(config_factory):
    config_factory.env(GROUP + HOSTS.replace('services = ["vllm"]\n\n[[hosts]]\nname = "gpu-c"',
                                             'services = ["api"]\n\n[[hosts]]\nname = "gpu-c"'))
    config_factory.routing({"llama-405b": BIG})
    with pytest.raises(ConfigError) as info:
        load_spec("test", config_factory.root)
    assert "host(s) gpu-b do not run the 'vllm' service" in str(info.value)


def test_cpu_hosts_give_one_worker_each(config_factory):
    """vLLM-CPU: a host without GPU is one pipeline stage (what the namespace tests deploy)."""
    cpu = HOSTS.replace("gpus = 8\n", "").replace("gpu_memory_gb = 80\n", "")
    config_factory.env(GROUP + cpu)
    config_factory.routing({"llama-405b": {**BIG, "tensor_parallel_size": 1}})
    spec = load_spec("test", config_factory.root)
    assert spec.placement.vllm[0].gpu_ids == ()


def test_other_models_share_a_groups_gpus_within_gpu_mem_use(config_factory):
    routing = {"llama-405b": {**BIG, "gpu_mem_use": 0.8},
               "small": {"model": "org/small", "port": 8002, "gpu_mem_use": 0.5}}
    config_factory.env('placement = { "llama-405b" = { group = "gpu-ab" }, "small" = ["gpu-b"] }'
                       '\n[groups.gpu-ab]\nhosts = ["gpu-a", "gpu-b"]\n' + HOSTS)
    config_factory.routing(routing)
    with pytest.raises(ConfigError) as info:
        load_spec("test", config_factory.root)
    assert "key 'small'" in str(info.value) and "GPU over-subscription on host gpu-b" in str(info.value)


def test_pipeline_deeper_than_the_layers_is_refused_from_config_json():
    found = args_problems("tiny", config={"num_hidden_layers": 2, "num_attention_heads": 4},
                          path="/m/config.json", max_model_len=None, tensor_parallel_size=1,
                          quantization=None, env={}, pipeline_parallel_size=3)
    assert found == ["model tiny: pipeline_parallel_size 3 is more than its 2 layers "
                     "(num_hidden_layers in /m/config.json): a stage holds at least one layer. "
                     "Fix: set pipeline_parallel_size to 2 or less in the routing-table entry "
                     "'tiny' (and the group's hosts to match)."]


def test_offline_config_check_reads_the_layers(config_factory, tmp_path):
    from pyalbert.cli.config_cmd import args_problems as offline

    storage = tmp_path / "models"
    (storage / "tiny").mkdir(parents=True)
    (storage / "tiny" / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    cpu = HOSTS.replace("gpus = 8\n", "").replace("gpu_memory_gb = 80\n", "")
    config_factory.env(f'storage_dir = "{storage}"\n' + GROUP.replace("llama-405b", "tiny") + cpu)
    config_factory.routing({"tiny": {**BIG, "tensor_parallel_size": 1}})
    found = offline(load_spec("test", config_factory.root).placement)
    assert [p.key for p in found] == ["tiny"]
    assert "pipeline_parallel_size 2 is more than its 1 layers" in str(found[0])
