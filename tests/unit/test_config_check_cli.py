"""``albert config check``: exit codes, the plan table, and the preflight from local metadata."""

from __future__ import annotations

import json

from pyalbert.cli import main


def test_check_prints_plan_and_exits_zero(simple_config, capsys):
    assert main(["config", "check", "--env", "test", "--config-dir", str(simple_config.root)]) == 0
    out = capsys.readouterr().out
    assert "albert-test-vllm-small" in out and "8001" in out and "ok:" in out


def test_check_json(simple_config, capsys):
    assert main(["config", "check", "--env", "test", "--config-dir", str(simple_config.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"] == {"small": ["http://127.0.0.1:8001"], "other": ["http://127.0.0.1:8002"]}


def test_bad_input_is_one_paragraph_and_non_zero(simple_config, capsys):
    simple_config.routing('{"a": {"model": "org/a", "port": 8001,}}')
    code = main(["config", "check", "--env", "test", "--config-dir", str(simple_config.root)])
    err = capsys.readouterr().err
    assert code == 2 and "malformed JSON" in err and "Traceback" not in err


LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "torch_dtype": "float16", "max_position_embeddings": 4096}


def test_preflight_refuses_a_model_too_big_for_the_gpu(config_factory, tmp_path, capsys):
    storage = tmp_path / "models"
    (storage / "big").mkdir(parents=True)
    (storage / "big" / "config.json").write_text(json.dumps(LLAMA_7B))
    config_factory.env(f'storage_dir = "{storage}"\n[[hosts]]\nname="g"\naddress="h"\ngpus=1\n'
                       "gpu_memory_gb=16\n")
    config_factory.routing({"big": {"model": "org/big", "port": 8001, "gpu_mem_use": 0.5,
                                    "max_model_len": 4096}})
    code = main(["config", "check", "--env", "test", "--config-dir", str(config_factory.root)])
    err = capsys.readouterr().err
    assert code == 2 and "big.gpu_mem_use" in err and "does not fit" in err
    # the same model fits on an 80 GB GPU
    config_factory.env(f'storage_dir = "{storage}"\n[[hosts]]\nname="g"\naddress="h"\ngpus=1\n'
                       "gpu_memory_gb=80\n")
    assert main(["config", "check", "--env", "test", "--config-dir", str(config_factory.root)]) == 0


def test_check_refuses_offline_what_the_deploy_preflight_refuses(config_factory, tmp_path, capsys):
    """Weights on disk: max_model_len over config.json's limit is refused by `albert config
    check` too, naming the key and the fix (CPU host: no "will it fit")."""
    storage = tmp_path / "models"
    (storage / "m-a").mkdir(parents=True)
    (storage / "m-a" / "config.json").write_text(json.dumps(LLAMA_7B))
    config_factory.env(f'storage_dir = "{storage}"\n[[hosts]]\nname="c"\naddress="h"\n')
    config_factory.routing({"m-a": {"model": "org/a", "port": 8001, "max_model_len": 999999}})
    code = main(["config", "check", "--env", "test", "--config-dir", str(config_factory.root)])
    err = capsys.readouterr().err
    assert code == 2 and "max_model_len 999999 is more than the model allows (4096" in err
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in err
    config_factory.routing({"m-a": {"model": "org/a", "port": 8001, "max_model_len": 999999,
                                    "env": {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}}})
    assert main(["config", "check", "--env", "test", "--config-dir", str(config_factory.root)]) == 0
