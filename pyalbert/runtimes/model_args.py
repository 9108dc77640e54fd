"""Refuse what cannot start, before stopping anything: the model's ``config.json`` on the host
against the routing table's arguments (issue 15 item 3).

A fact (``cat config.json``, parsed by :func:`parse_config`) and a typed check
(:class:`ModelArgsFit`) whose verdict names the key and the fix: ``max_model_len`` within the
model's limit (unless ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` is in the model's ``env``, as vLLM
asks), ``tensor_parallel_size`` dividing the attention heads, ``quantization`` matching the
weights' ``quantization_config.quant_method``, a ``--dtype`` vLLM knows. Pure but the command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyalbert.commands.base import Cmd, any_of
from pyalbert.remote import Result
from pyalbert.runtimes.checks import Check, HostFacts

#: the keys vLLM reads for a model's context length (the smallest present is the limit)
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
               "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")
#: rope scalings whose factor vLLM does not multiply into the limit
UNSCALED_ROPE = ("su", "longrope", "llama3", "mrope", "default")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LONG_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


def read_config(model_dir: str) -> Cmd:
    """The model's ``config.json`` (nothing when absent: ModelPresent says so)."""
    return any_of(Cmd.of("cat", f"{model_dir}/config.json"), Cmd.of("true"))


def parse_config(stdout: str) -> dict | None:
    try:
        data = json.loads(stdout)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    text = data.get("text_config")  # multimodal models: the language model's numbers
    return {**data, **text} if isinstance(text, dict) else data


def length_limit(config: Mapping) -> tuple[int, str] | None:
    """(the model's longest context, the key it comes from) or None when none is given."""
    found = [(int(config[k]), k) for k in LENGTH_KEYS if isinstance(config.get(k), int | float)]
    if not found:
        return None
    limit, key = min(found)
    rope = config.get("rope_scaling")
    if isinstance(rope, Mapping):
        kind = rope.get("rope_type") or rope.get("type") or ""
        factor = rope.get("factor")
        if kind not in UNSCALED_ROPE and isinstance(factor, int | float) and factor > 1:
            limit, key = int(limit * factor), f"{key} x rope_scaling.factor {factor:g}"
    return limit, key


def _dtype(extra_args: Sequence[str]) -> str | None:
    args = list(extra_args)
    for i, a in enumerate(args):
        if a == "--dtype" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--dtype="):
            return a.split("=", 1)[1]
    return None


def problems(model_id: str, *, config: Mapping, path: str, max_model_len: int | None,
             tensor_parallel_size: int, quantization: str | None, env: Mapping[str, str],
             extra_args: Sequence[str] = (), pipeline_parallel_size: int = 1) -> list[str]:
    """Why vLLM would refuse these arguments for this model (one sentence each, with the fix)."""
    where = f"routing-table entry '{model_id}'"
    out = []
    limit = length_limit(config)
    if max_model_len and limit and max_model_len > limit[0] and env.get(LONG_ENV) != "1":
        out.append(f"model {model_id}: max_model_len {max_model_len} is more than the model allows "
                   f"({limit[0]}, {limit[1]} in {path}); vLLM would exit at start. Fix: set "
                   f"max_model_len to {limit[0]} or less in the {where}, or add "
                   f'"{LONG_ENV}": "1" to its env if the model really reads longer inputs.')
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads % tensor_parallel_size:
        out.append(f"model {model_id}: tensor_parallel_size {tensor_parallel_size} does not divide "
                   f"its {heads} attention heads (num_attention_heads in {path}). Fix: set "
                   f"tensor_parallel_size to a divisor of {heads} in the {where}.")
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and pipeline_parallel_size > layers:
        out.append(f"model {model_id}: pipeline_parallel_size {pipeline_parallel_size} is more "
                   f"than its {layers} layers (num_hidden_layers in {path}): a stage holds at "
                   f"least one layer. Fix: set pipeline_parallel_size to {layers} or less in the "
                   f"{where} (and the group's hosts to match).")
    qc = config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, Mapping) else ""
    if quantization:
        base = quantization.removesuffix("_marlin")
        if method and method != base:
            out.append(f"model {model_id}: quantization {quantization} does not match the weights "
                       f"({method}, quantization_config.quant_method in {path}). Fix: set "
                       f"quantization to {method} or remove it from the {where}.")
        elif not method and base in ("awq", "gptq", "gguf"):
            out.append(f"model {model_id}: quantization {quantization} needs {base} weights, these "
                       f"are not quantized (no quantization_config in {path}). Fix: remove "
                       f"quantization from the {where}, or point it at {base} weights.")
    dtype = _dtype(extra_args)
    if dtype and dtype not in DTYPES:
        out.append(f"model {model_id}: --dtype {dtype} is not one vLLM knows ({', '.join(DTYPES)}). "
                   f"Fix: change it in the extra_args of the {where}.")
    return out


@dataclass(frozen=True)
class ModelArgsFit(Check):
    """The routing table's arguments against the model's ``config.json`` on the host."""

    model_id: str
    model_dir: str
    max_model_len: int | None
    tensor_parallel_size: int
    quantization: str | None
    env: tuple[tuple[str, str], ...] = ()
    extra_args: tuple[str, ...] = ()
    pipeline_parallel_size: int = 1

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"{self.model_id}: arguments fit {self.model_dir}/config.json"

    @property
    def cmd(self) -> Cmd:
        return read_config(self.model_dir)

    def judge(self, res: Result, host: HostFacts) -> str | None:
        config = parse_config(res.stdout)
        if config is None:
            return None
        found = problems(self.model_id, config=config, path=f"{self.model_dir}/config.json",
                         max_model_len=self.max_model_len,
                         tensor_parallel_size=self.tensor_parallel_size,
                         quantization=self.quantization, env=dict(self.env),
                         extra_args=self.extra_args,
                         pipeline_parallel_size=self.pipeline_parallel_size)
        return " ".join(found) or None
