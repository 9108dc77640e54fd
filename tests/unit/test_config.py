"""The config model: every bad input names file, key and fix; good input resolves to a plan."""

from __future__ import annotations

import pytest

from pyalbert.config import load_spec, resolve_placement
from pyalbert.errors import ConfigError


def check(factory, env: str = "test"):
    return load_spec(env, factory.root)


def error_of(factory, env: str = "test") -> str:
    with pytest.raises(ConfigError) as info:
        check(factory, env)
    return str(info.value)


def test_valid_config_resolves_hosts_ports_and_gpus(simple_config):
    plan = resolve_placement(check(simple_config))
    assert [(i.name, i.host.name, i.port, i.gpu_ids) for i in plan.vllm] == [
        ("albert-test-vllm-small", "gpu-1", 8001, (0,)),
        ("albert-test-vllm-other", "gpu-1", 8002, (0,)),
    ]
    # the only gateway runs on the servers' host: they listen on loopback only (issue 14)
    assert plan.backends == {"small": ["http://127.0.0.1:8001"], "other": ["http://127.0.0.1:8002"]}
    assert [a.name for a in plan.api] == ["albert-test-api"]


def test_unknown_key_names_file_key_and_suggests_spelling(simple_config):
    simple_config.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_usee": 0.4}})
    message = error_of(simple_config)
    assert "llm_routing_table.json" in message
    assert "small.gpu_mem_usee" in message
    assert "did you mean 'gpu_mem_use'" in message


def test_unknown_key_in_environment_file(simple_config):
    simple_config.env('routing_tabel = "x.json"\n' + "[[hosts]]\nname='a'\naddress='h'\n")
    message = error_of(simple_config)
    assert "test.toml" in message and "routing_tabel" in message and "routing_table" in message


def test_legacy_tensor_parralel_size_is_read_with_a_warning(simple_config):
    simple_config.routing({"small": {"model": "org/small", "port": 8001, "tensor_parralel_size": 1}})
    spec = check(simple_config)
    assert spec.models["small"].tensor_parallel_size == 1
    assert any("tensor_parralel_size" in n and "tensor_parallel_size" in n for n in spec.notes)


def test_both_spellings_of_tensor_parallel_size_is_an_error(simple_config):
    simple_config.routing(
        {"small": {"model": "o/s", "port": 8001, "tensor_parralel_size": 1, "tensor_parallel_size": 1}}
    )
    assert "keep only 'tensor_parallel_size'" in error_of(simple_config)


def test_the_guides_env_names_where_a_model_is_served(simple_config):
    """The original guide's tables say "env": "<environment>" (or a list): served there only."""
    simple_config.routing({
        "small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4, "env": "test"},
        "other": {"model": "org/other", "port": 8002, "env": ["prod", "staging"]},
        "both": {"model": "org/both", "port": 8003, "gpu_mem_use": 0.4,
                 "environments": ["test", "prod"],
                 "env": {"VLLM_LOGGING_LEVEL": "INFO"}},
    })
    spec = check(simple_config)
    assert spec.models.ids() == ["small", "both"]
    assert spec.models["small"].env == {} and spec.models["small"].environments == ("test",)
    assert spec.models["both"].env == {"VLLM_LOGGING_LEVEL": "INFO"}
    assert [i.model_id for i in resolve_placement(spec).vllm] == ["small", "both"]
    assert any("'env' as environment name" in n and "'environments'" in n for n in spec.notes)


def test_an_environment_that_serves_no_model_says_which_key_to_fix(simple_config):
    simple_config.routing({"small": {"model": "org/small", "port": 8001, "env": "prod"}})
    message = error_of(simple_config)
    assert "llm_routing_table.json" in message and "no model is served in environment 'test'" in message
    assert "add 'test' to the 'environments'" in message


def test_env_names_and_environments_together_is_an_error(simple_config):
    simple_config.routing({"small": {"model": "o/s", "port": 8001, "env": "test",
                                     "environments": ["test"]}})
    assert "keep only 'environments'" in error_of(simple_config)


def test_duplicate_ports_on_one_host(simple_config):
    simple_config.routing(
        {
            "a": {"model": "org/a", "port": 8001, "gpu_mem_use": 0.3},
            "b": {"model": "org/b", "port": 8001, "gpu_mem_use": 0.3},
        }
    )
    message = error_of(simple_config)
    assert "b.port" in message and "8001" in message and "model 'a'" in message


def test_port_clash_with_the_api(simple_config):
    simple_config.routing({"a": {"model": "org/a", "port": 8080}})
    assert "api service" in error_of(simple_config)


def test_gpu_oversubscription(simple_config):
    simple_config.routing(
        {
            "a": {"model": "org/a", "port": 8001, "gpu_mem_use": 0.6},
            "b": {"model": "org/b", "port": 8002, "gpu_mem_use": 0.6},
        }
    )
    message = error_of(simple_config)
    assert "GPU over-subscription on host gpu-1" in message and "'b'" not in message.split("key")[0]
    assert "key 'b'" in message and "lower gpu_mem_use" in message


def test_tensor_parallel_wider_than_host(simple_config):
    simple_config.routing({"a": {"model": "org/a", "port": 8001, "tensor_parallel_size": 2}})
    assert "tensor_parallel_size 2 > 1 GPU(s) on host gpu-1" in error_of(simple_config)


def test_tensor_parallel_spreads_over_gpus(config_factory):
    config_factory.env("[[hosts]]\nname='big'\naddress='h'\ngpus=4\n")
    config_factory.routing(
        {
            "a": {"model": "org/a", "port": 8001, "tensor_parallel_size": 2, "gpu_mem_use": 0.9},
            "b": {"model": "org/b", "port": 8002, "tensor_parallel_size": 2, "gpu_mem_use": 0.9},
        }
    )
    plan = resolve_placement(check(config_factory))
    assert [i.gpu_ids for i in plan.vllm] == [(0, 1), (2, 3)]


@pytest.mark.parametrize(
    "model_id", ["../etc", "a b", "/abs", ".hidden", "a/b/c", "org/..", ""], ids=repr
)
def test_invalid_model_ids(simple_config, model_id):
    simple_config.routing({model_id: {"model": "org/a", "port": 8001}})
    assert "not a valid model id" in error_of(simple_config)


def test_invalid_hub_repo_id(simple_config):
    simple_config.routing({"a": {"model": "org/../../x", "port": 8001}})
    assert "a.model" in error_of(simple_config)


def test_malformed_json_gives_line_and_column(simple_config):
    simple_config.routing('{\n  "a": {"model": "org/a", "port": 8001,}\n}')
    message = error_of(simple_config)
    assert "malformed JSON at line 2, column" in message and "llm_routing_table.json" in message


def test_malformed_toml(simple_config):
    simple_config.env("[[hosts]\nname=")
    assert "malformed TOML" in error_of(simple_config)


def test_unknown_environment_lists_known_ones(simple_config):
    message = error_of(simple_config, env="nope")
    assert "no environment named 'nope'" in message and "test" in message


def test_gpu_memory_fraction_bounds(simple_config):
    simple_config.routing({"a": {"model": "org/a", "port": 8001, "gpu_mem_use": 1.5}})
    assert "a.gpu_mem_use" in error_of(simple_config)


def test_replicas_spread_over_hosts(config_factory):
    config_factory.env(
        "[[hosts]]\nname='h1'\naddress='10.0.0.1'\ngpus=1\n"
        "[[hosts]]\nname='h2'\naddress='10.0.0.2'\ngpus=1\nservices=['vllm']\n"
    )
    config_factory.routing({"a": {"model": "org/a", "port": 8001, "replicas": 2}})
    plan = resolve_placement(check(config_factory))
    # h1 runs the only gateway: its replica on loopback, h2's on its (private) address
    assert plan.backends == {"a": ["http://127.0.0.1:8001", "http://10.0.0.2:8001"]}


def test_more_replicas_than_hosts(simple_config):
    simple_config.routing({"a": {"model": "org/a", "port": 8001, "replicas": 3}})
    assert "3 replicas but only 1 host" in error_of(simple_config)


def test_placement_names_unknown_host(simple_config):
    simple_config.env(
        "[[hosts]]\nname='gpu-1'\naddress='h'\ngpus=1\n[placement]\nsmall=['gpu-9']\n"
    )
    assert "gpu-9" in error_of(simple_config)


def test_cpu_host_rejects_tensor_parallel(config_factory):
    config_factory.env("[[hosts]]\nname='cpu'\naddress='h'\n")
    config_factory.routing({"a": {"model": "org/a", "port": 8001, "tensor_parallel_size": 2}})
    assert "has no GPU" in error_of(config_factory)


def test_secrets_come_from_the_environment(simple_config, monkeypatch, tmp_path):
    spec = check(simple_config)
    ref = spec.env.secrets["hf_token"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert ref.resolve() is None
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert ref.resolve().get_secret_value() == "hf_abc"
    assert "hf_abc" not in repr(ref.resolve())


def test_repo_environments_are_valid():
    for env in ("local", "staging", "production"):
        plan = resolve_placement(load_spec(env))
        assert plan.vllm and plan.api


def test_pipeline_images_override_the_environment_file(simple_config, monkeypatch):
    monkeypatch.setenv("ALBERT_VLLM_IMAGE", "registry.example/vllm:abc123")
    monkeypatch.delenv("ALBERT_API_IMAGE", raising=False)
    env = check(simple_config).env
    assert env.images.vllm == "registry.example/vllm:abc123"
    assert env.images.api == "albert-api:latest"


# -- [metrics] ------------------------------------------------------------------------------------
METRICS_ENV = "[[hosts]]\nname='gpu-1'\naddress='h'\ngpus=1\n[api]\nport=8080\n"


def test_metrics_defaults_to_disabled_on_the_first_api_host(simple_config):
    spec = check(simple_config)
    assert spec.env.metrics.enabled is False and spec.env.metrics.port == 9090
    assert spec.env.images.prometheus == "prom/prometheus:v2.53.0"


def test_metrics_host_not_in_hosts_names_file_key_and_fix(simple_config):
    simple_config.env(METRICS_ENV + "[metrics]\nenabled=true\nhost='monitor'\n")
    message = error_of(simple_config)
    assert "test.toml" in message and "metrics.host" in message
    assert "'monitor' is not in 'hosts'" in message and "name one of gpu-1" in message


@pytest.mark.parametrize("port, owner", [(8080, "the api service (api.port)"), (8001, "model 'small'")],
                         ids=["api", "model"])
def test_metrics_port_clash_names_file_key_and_fix(simple_config, port, owner):
    simple_config.env(METRICS_ENV + f"[metrics]\nenabled=true\nport={port}\n")
    simple_config.routing({"small": {"model": "org/small", "port": 8001}})
    message = error_of(simple_config)
    assert "test.toml" in message and "metrics.port" in message
    assert f"port {port} on host gpu-1 (Prometheus) is already used by {owner}" in message
    assert "give Prometheus another port" in message


def test_metrics_port_is_free_when_disabled_or_on_another_host(config_factory):
    config_factory.env("[[hosts]]\nname='a'\naddress='h'\ngpus=1\nservices=['vllm']\n"
                       "[[hosts]]\nname='b'\naddress='i'\nservices=['api']\n"
                       "[api]\nport=9090\n[metrics]\nenabled=true\nhost='a'\n")
    config_factory.routing({"small": {"model": "org/small", "port": 8001}})
    assert check(config_factory).env.metrics.host == "a"


def test_metrics_port_counts_only_the_ports_of_the_prometheus_host(config_factory):
    # a model on host 'a' uses 9090; Prometheus (and the api) on host 'b': no clash
    config_factory.env("[[hosts]]\nname='a'\naddress='h'\ngpus=1\nservices=['vllm']\n"
                       "[[hosts]]\nname='b'\naddress='i'\nservices=['api']\n"
                       "[api]\nport=8080\n[metrics]\nenabled=true\nport=9090\n")
    config_factory.routing({"small": {"model": "org/small", "port": 9090}})
    assert check(config_factory).env.metrics.port == 9090


LOOPBACK_ENV = ("[[hosts]]\nname='gpu-1'\naddress='h'\ngpus=1\nservices=['vllm','api']\n"
                "[[hosts]]\nname='mon'\naddress='i'\nservices=[]\n[metrics]\nenabled=true\n")


def test_prometheus_away_from_loopback_vllm_servers_is_refused_naming_key_and_fix(config_factory):
    config_factory.env(LOOPBACK_ENV + "host='mon'\n")
    config_factory.routing({"small": {"model": "org/small", "port": 8001}})
    message = error_of(config_factory)
    assert "test.toml" in message and "metrics.host" in message
    assert "Prometheus on host mon cannot scrape the vLLM servers of host gpu-1" in message
    assert "listen on 127.0.0.1 only" in message and "set metrics.host = 'gpu-1'" in message


@pytest.mark.parametrize("host", ["", "host='gpu-1'\n"], ids=["default", "same-host"])
def test_prometheus_beside_loopback_vllm_servers_is_accepted(config_factory, host):
    config_factory.env(LOOPBACK_ENV + host)
    config_factory.routing({"small": {"model": "org/small", "port": 8001}})
    assert resolve_placement(check(config_factory)).vllm[0].listen == "127.0.0.1"


def test_metrics_bad_duration_names_the_key(simple_config):
    simple_config.env(METRICS_ENV + "[metrics]\nretention='15 days'\n")
    message = error_of(simple_config)
    assert "metrics.retention" in message and "not a Prometheus duration" in message
