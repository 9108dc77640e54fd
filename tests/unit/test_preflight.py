"""Preflight "will it fit": numbers for known model shapes, against known GPU sizes."""

from __future__ import annotations

import json

import pytest

from pyalbert.image.preflight import GiB, ModelMetadata, PreflightError, estimate, load_metadata

#: meta-llama/Llama-2-7b-hf config.json (the fields that matter): 6.74 B parameters
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "float16",
    "tie_word_embeddings": False,
}
#: the same model as an AWQ 4-bit checkpoint
LLAMA2_7B_AWQ = {**LLAMA2_7B, "quantization_config": {
    "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}}
#: mistralai/Mistral-7B-v0.1: grouped-query attention, 8 KV heads, 32k context
MISTRAL_7B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}


def test_llama2_7b_fp16_parameters_weights_and_kv_cache():
    e = estimate(LLAMA2_7B, gpu_memory_gb=24, gpu_memory_utilization=0.9, max_model_len=4096)
    assert e.parameters == pytest.approx(6.738e9, rel=0.002)
    assert e.weight_bytes == e.parameters * 2
    assert e.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert e.kv_min_bytes == 2 * GiB
    assert e.needed_per_gpu / GiB == pytest.approx(12.55 + 2 + 1, abs=0.02)
    assert e.budget_per_gpu / GiB == pytest.approx(21.6)
    assert e.fits and e.check() is e


def test_llama2_7b_fp16_does_not_fit_a_16_gib_gpu_and_says_by_how_much():
    e = estimate(LLAMA2_7B, gpu_memory_gb=16, gpu_memory_utilization=0.9, max_model_len=4096,
                 model="albert-light")
    assert not e.fits
    with pytest.raises(PreflightError) as err:
        e.check()
    text = str(err.value)
    assert "albert-light: needs 15.55 GiB per GPU" in text
    assert "budget 14.40 GiB per GPU (16.00 GiB x gpu_memory_utilization 0.9" in text
    assert "short by 1.15 GiB" in text
    assert "quantized checkpoint" in text


def test_llama2_7b_awq_fits_the_same_16_gib_gpu():
    e = estimate(LLAMA2_7B_AWQ, gpu_memory_gb=16, gpu_memory_utilization=0.9, max_model_len=4096)
    # 6.48 B linear weights at 4 bits + group scales, 0.26 B embedding weights kept in fp16
    assert e.weight_bytes / GiB == pytest.approx(3.62, abs=0.02)
    assert e.fits


def test_quantization_from_the_routing_table_when_the_config_does_not_say():
    plain = estimate(LLAMA2_7B, gpu_memory_gb=16, max_model_len=4096)
    awq = estimate(LLAMA2_7B, gpu_memory_gb=16, max_model_len=4096, quantization="awq")
    fp8 = estimate(LLAMA2_7B, gpu_memory_gb=16, max_model_len=4096, quantization="fp8")
    assert awq.weight_bytes < fp8.weight_bytes < plain.weight_bytes


def test_gqa_shrinks_the_kv_cache_and_max_model_len_defaults_to_the_context():
    e = estimate(MISTRAL_7B, gpu_memory_gb=24, gpu_memory_utilization=0.9)
    assert e.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert e.max_model_len == 32768
    assert e.kv_min_bytes == 4 * GiB
    assert e.parameters == pytest.approx(7.24e9, rel=0.005)


def test_tensor_parallelism_splits_weights_and_cache():
    one = estimate(LLAMA2_7B, gpu_memory_gb=80, max_model_len=4096)
    two = estimate(LLAMA2_7B, gpu_memory_gb=80, max_model_len=4096, tensor_parallel_size=2)
    assert two.needed_per_gpu - two.margin_bytes == pytest.approx(
        (one.needed_per_gpu - one.margin_bytes) / 2, abs=1)


def test_weight_files_win_over_the_parameter_count_and_float32_is_served_in_16_bits():
    meta = ModelMetadata({**LLAMA2_7B, "torch_dtype": "float32"}, weight_file_bytes=28 * 10**9)
    served = estimate(meta, gpu_memory_gb=80, max_model_len=1024)
    assert served.weight_bytes == 14 * 10**9
    assert "weight files x 0.5" in served.weight_basis
    kept = estimate(meta, gpu_memory_gb=80, max_model_len=1024, extra_args=["--dtype", "float32"])
    assert kept.weight_bytes == 28 * 10**9
    assert kept.kv_bytes_per_token == 2 * served.kv_bytes_per_token


def test_fp8_kv_cache_halves_it():
    e = estimate(LLAMA2_7B, gpu_memory_gb=24, max_model_len=4096, extra_args=["--kv-cache-dtype", "fp8"])
    assert e.kv_bytes_per_token == 256 * 1024


def test_metadata_from_a_model_directory(tmp_path):
    assert load_metadata(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 50)
    assert load_metadata(tmp_path).weight_file_bytes == 150
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 140}}')
    assert load_metadata(tmp_path).weight_file_bytes == 140
    (tmp_path / ".albert-manifest.json").write_text(json.dumps({"files": {
        "model-00001-of-00002.safetensors": {"size": 1000}, "config.json": {"size": 5}}}))
    assert load_metadata(tmp_path).weight_file_bytes == 1000
