"""Refuse what cannot start: routing-table arguments against the model's config.json (issue 15)."""

import json

import pytest

from pyalbert.remote import Result
from pyalbert.runtimes.checks import HostFacts
from pyalbert.runtimes.model_args import (
    ModelArgsFit,
    length_limit,
    parse_config,
    problems,
    read_config,
)

# trimmed from Qwen2.5-0.5B-Instruct's config.json (the e2e model) and a Mixtral AWQ one
QWEN = json.loads("""{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
  "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
  "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
  "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": 32768,
  "torch_dtype": "bfloat16"}""")
AWQ = {"max_position_embeddings": 32768, "num_attention_heads": 32,
       "quantization_config": {"bits": 4, "quant_method": "awq", "version": "gemm"}}
PATH = "/models/m-a/config.json"
HOST = HostFacts("gitlab", "local", "/b", lambda: set())


def fit(config=QWEN, **kw):
    args = {"max_model_len": None, "tensor_parallel_size": 1, "quantization": None, "env": {}}
    return problems("m-a", config=config, path=PATH, **{**args, **kw})


def test_read_config_is_a_fact_that_never_fails():
    assert read_config("/models/m-a").render() == "cat /models/m-a/config.json || true"
    assert parse_config(json.dumps(QWEN))["num_attention_heads"] == 14
    assert parse_config("") is None and parse_config("[1]") is None


def test_max_model_len_over_the_limit_names_key_limit_and_fixes():
    (text,) = fit(max_model_len=999999)
    assert "max_model_len 999999" in text and "(32768, max_position_embeddings in " + PATH in text
    assert "set max_model_len to 32768 or less in the routing-table entry 'm-a'" in text
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in text


@pytest.mark.parametrize("kw", [{"max_model_len": 32768}, {"max_model_len": 999999, "env": {
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}}], ids=["at-limit", "allowed-by-env"])
def test_max_model_len_accepted(kw):
    assert fit(**kw) == []


def test_limits_take_the_smallest_key_and_rope_factor():
    assert length_limit({"max_position_embeddings": 4096, "seq_length": 2048}) == (2048, "seq_length")
    assert length_limit({"max_position_embeddings": 4096,
                         "rope_scaling": {"type": "linear", "factor": 2.0}})[0] == 8192
    assert length_limit({"max_position_embeddings": 131072,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})[0] == 131072
    assert length_limit({"text_config": {}}) is None
    assert parse_config(json.dumps({"text_config": {"max_position_embeddings": 8192}}))[
        "max_position_embeddings"] == 8192


def test_tensor_parallel_must_divide_the_heads():
    (text,) = fit(tensor_parallel_size=4)
    assert "tensor_parallel_size 4 does not divide its 14 attention heads" in text
    assert fit(tensor_parallel_size=2) == []


@pytest.mark.parametrize("config, quantization, expected", [
    (AWQ, "awq", None), (AWQ, "awq_marlin", None), (AWQ, None, None),
    (AWQ, "gptq", "quantization gptq does not match the weights (awq"),
    (QWEN, "awq", "needs awq weights, these are not quantized"),
    (QWEN, "fp8", None),  # vLLM quantizes on the fly
], ids=["awq", "awq-marlin", "auto", "gptq-on-awq", "awq-on-plain", "fp8-online"])
def test_quantization_matches_the_weights(config, quantization, expected):
    found = fit(config, quantization=quantization)
    assert (found == []) if expected is None else (expected in found[0])


def test_dtype_must_be_known():
    (text,) = problems("m-a", config=QWEN, path=PATH, max_model_len=None, tensor_parallel_size=1,
                       quantization=None, env={}, extra_args=("--dtype", "fp4"))
    assert "--dtype fp4 is not one vLLM knows" in text
    assert fit(extra_args=("--dtype=bfloat16",)) == []


def test_the_check_carries_its_verdict():
    check = ModelArgsFit("m-a", "/models/m-a", 999999, 1, None)
    res = Result(check.cmd, 0, json.dumps(QWEN), "")
    assert "max_model_len 999999" in check.verdict(res, HOST)
    assert check.verdict(Result(check.cmd, 0, "", ""), HOST) is None  # no config.json: ModelPresent
    unknown = Result(check.cmd, 0, "", "", known=False)
    assert check.verdict(unknown, HOST) is None
