"""Preflight "will it fit": weights + a minimum KV cache against the GPU memory vLLM may use.

Pure arithmetic on hub metadata that is already on disk (``config.json``, the safetensors sizes
from the storage dir manifest or the files themselves): never the network. vLLM reserves
``gpu_memory_utilization`` of each GPU; in it go the weights (split over ``tensor_parallel_size``
GPUs), activations (a margin here) and a KV cache that must hold at least ``max_model_len``
tokens, else vLLM refuses to start after minutes of loading. This answers before building.

``estimate(...)`` is the entry point (``albert image build``, ``albert node spec``, later
``albert config check``); :func:`load_metadata` reads a model directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyalbert.errors import AlbertError

GiB = 1024**3

#: bytes per element of the dtypes a checkpoint or the server may use
DTYPE_BYTES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1,
}
#: bits per linear-layer weight of quantized checkpoints (embeddings stay 16-bit)
QUANT_BITS = {"awq": 4, "awq_marlin": 4, "gptq": 4, "gptq_marlin": 4, "bitsandbytes": 4, "fp8": 8}
#: activations, sampler and allocator slack inside the vLLM budget, per GPU
DEFAULT_MARGIN_BYTES = 1 * GiB
#: config.json keys naming the per-layer experts of mixture-of-experts models
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class PreflightError(AlbertError):
    """The model does not fit: the message carries the numbers and what to change."""


@dataclass(frozen=True)
class ModelMetadata:
    """What the estimate needs from a model directory or the hub."""

    config: Mapping
    #: total size of the weight files (safetensors), when known
    weight_file_bytes: int | None = None
    source: str = ""


@dataclass(frozen=True)
class Estimate:
    model: str
    parameters: int
    weight_bytes: int  # all GPUs together, as served
    weight_basis: str  # how weight_bytes was obtained
    kv_bytes_per_token: int  # all GPUs together
    max_model_len: int
    margin_bytes: int  # per GPU
    gpu_memory_bytes: int  # one GPU
    gpu_memory_utilization: float
    tensor_parallel_size: int

    @property
    def kv_min_bytes(self) -> int:
        return self.kv_bytes_per_token * self.max_model_len

    @property
    def needed_per_gpu(self) -> int:
        tp = self.tensor_parallel_size
        return (self.weight_bytes + self.kv_min_bytes) // tp + self.margin_bytes

    @property
    def budget_per_gpu(self) -> int:
        return int(self.gpu_memory_bytes * self.gpu_memory_utilization)

    @property
    def fits(self) -> bool:
        return self.needed_per_gpu <= self.budget_per_gpu

    @property
    def kv_tokens_possible(self) -> int:
        """Tokens of KV cache left once weights and margin are in (all sequences together)."""
        free = (self.budget_per_gpu - self.margin_bytes) * self.tensor_parallel_size - self.weight_bytes
        return max(0, free // max(1, self.kv_bytes_per_token))

    def summary(self) -> str:
        tp = self.tensor_parallel_size
        return (
            f"{self.model}: needs {_gib(self.needed_per_gpu)} per GPU = weights "
            f"{_gib(self.weight_bytes)} ({self.weight_basis}) + KV cache for {self.max_model_len} "
            f"tokens {_gib(self.kv_min_bytes)} ({self.kv_bytes_per_token // 1024} KiB/token)"
            f"{f' over {tp} GPUs' if tp > 1 else ''} + margin {_gib(self.margin_bytes)}; "
            f"budget {_gib(self.budget_per_gpu)} per GPU ({_gib(self.gpu_memory_bytes)} x "
            f"gpu_memory_utilization {self.gpu_memory_utilization:g}, tensor_parallel_size {tp})"
        )

    def check(self) -> Estimate:
        """Self when it fits, else :class:`PreflightError` with the numbers and the fixes."""
        if self.fits:
            return self
        raise PreflightError(
            f"preflight: the model will not fit. {self.summary()}: short by "
            f"{_gib(self.needed_per_gpu - self.budget_per_gpu)} per GPU. Fix: in the routing table "
            f"raise gpu_mem_use or tensor_parallel_size, lower max_model_len, or use a quantized "
            f"checkpoint (awq/gptq), or target GPUs with more memory (--gpu-memory-gb)."
        )

    def as_dict(self) -> dict:
        return {
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_min_bytes": self.kv_min_bytes,
            "needed_per_gpu_bytes": self.needed_per_gpu,
            "budget_per_gpu_bytes": self.budget_per_gpu,
            "fits": self.fits,
        }


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _text_config(config: Mapping) -> Mapping:
    """Multimodal configs nest the language model's settings."""
    return config.get("text_config") or config.get("llm_config") or config


def _int(config: Mapping, *keys: str, default: int | None = None) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    if default is None:
        raise AlbertError(
            f"config.json has none of {', '.join(keys)}: cannot estimate the model's size. Fix: "
            "check the model directory holds the hub's config.json, or skip the preflight."
        )
    return default


def shape(config: Mapping) -> dict[str, int]:
    """Layers, hidden size, heads, KV heads, head dim, vocab, MLP size, experts of a config."""
    c = _text_config(config)
    hidden = _int(c, "hidden_size", "n_embd", "d_model")
    heads = _int(c, "num_attention_heads", "n_head")
    return {
        "layers": _int(c, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": _int(c, "num_key_value_heads", "num_kv_heads", default=heads),
        "head_dim": _int(c, "head_dim", default=hidden // heads),
        "vocab": _int(c, "vocab_size"),
        "intermediate": _int(c, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim",
                             default=4 * hidden),
        "experts": _int(c, *_EXPERT_KEYS, default=1),
        "tied": int(bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))),
    }


def parameter_counts(config: Mapping) -> tuple[int, int]:
    """(linear-layer parameters, embedding + norm parameters) of a Llama-like decoder.

    Attention q/k/v/o plus a gated MLP (3 matrices) per layer and per expert; embeddings and
    the LM head (unless tied). Within a few percent for Llama, Mistral, Qwen, Gemma.
    """
    s = shape(config)
    h, d = s["hidden"], s["head_dim"]
    attention = h * d * (2 * s["heads"] + 2 * s["kv_heads"])
    mlp = 3 * h * s["intermediate"] * s["experts"]
    linear = s["layers"] * (attention + mlp)
    embeddings = s["vocab"] * h * (1 if s["tied"] else 2) + (2 * s["layers"] + 1) * h
    return linear, embeddings


def checkpoint_dtype(config: Mapping) -> str:
    c = _text_config(config)
    value = str(c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype") or "float16")
    return value.removeprefix("torch.")


def serving_dtype(config: Mapping, extra_args: Sequence[str] = ()) -> str:
    """What vLLM computes in: ``--dtype`` if given, else the checkpoint's, float32 -> float16."""
    explicit = _flag(extra_args, "--dtype")
    if explicit and explicit != "auto":
        return explicit
    dtype = checkpoint_dtype(config)
    return "float16" if dtype in ("float32", "float") else dtype


def _flag(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def quantization_bits(config: Mapping, quantization: str | None) -> int | None:
    """Bits per linear weight: the checkpoint's ``quantization_config``, else the method's."""
    qc = config.get("quantization_config") or {}
    method = quantization or qc.get("quant_method")
    if not method:
        return None
    bits = qc.get("bits") or qc.get("w_bit")
    if bits:
        return int(bits)
    if qc.get("load_in_8bit"):
        return 8
    return QUANT_BITS.get(str(method), 4)


def estimate(
    metadata: ModelMetadata | Mapping,
    *,
    gpu_memory_gb: float,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    quantization: str | None = None,
    extra_args: Sequence[str] = (),
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    model: str = "model",
) -> Estimate:
    """Memory one replica needs per GPU vs what vLLM may take (``gpu_memory_gb`` in GiB).

    Weights: the weight files' size when known (scaled when vLLM serves a float32 checkpoint in
    16 bits), else the parameter count x bytes per weight (quantization-aware: 4-bit AWQ/GPTQ
    keep 16-bit embeddings and add a group-scale overhead). KV cache: 2 (K and V) x layers x KV
    heads x head dim x bytes x ``max_model_len`` (default: the config's context length).
    """
    meta = metadata if isinstance(metadata, ModelMetadata) else ModelMetadata(metadata)
    config = meta.config
    s = shape(config)
    linear, embeddings = parameter_counts(config)
    dtype = serving_dtype(config, extra_args)
    element = DTYPE_BYTES.get(dtype, 2)
    bits = quantization_bits(config, quantization)
    if meta.weight_file_bytes:
        scale = 1.0
        if bits is None:
            scale = element / DTYPE_BYTES.get(checkpoint_dtype(config), 2)
        weight_bytes = int(meta.weight_file_bytes * scale)
        basis = "weight files" + (f" x {scale:g} for {dtype}" if scale != 1.0 else "")
    elif bits is not None:
        # group size 128: one 16-bit scale and one packed zero per group
        per_weight = bits / 8 + (2 + bits / 8) / 128
        weight_bytes = int(linear * per_weight + embeddings * 2)
        basis = f"{(linear + embeddings) / 1e9:.2f}B params, {bits}-bit linear layers"
    else:
        weight_bytes = (linear + embeddings) * element
        basis = f"{(linear + embeddings) / 1e9:.2f}B params x {element} bytes ({dtype})"
    kv_dtype = _flag(extra_args, "--kv-cache-dtype")
    kv_element = DTYPE_BYTES.get(kv_dtype, 1) if kv_dtype and kv_dtype != "auto" else element
    kv_per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * kv_element
    context = max_model_len or _int(_text_config(config), "max_position_embeddings", "n_positions",
                                    "max_seq_len", default=4096)
    return Estimate(
        model=model,
        parameters=linear + embeddings,
        weight_bytes=weight_bytes,
        weight_basis=basis,
        kv_bytes_per_token=kv_per_token,
        max_model_len=context,
        margin_bytes=margin_bytes,
        gpu_memory_bytes=int(gpu_memory_gb * GiB),
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    )


def _weights_from_manifest(model_dir: Path) -> int | None:
    """Sum of ``*.safetensors`` sizes in the storage dir manifest (``.albert-manifest.json``)."""
    try:
        data = json.loads((model_dir / ".albert-manifest.json").read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sizes = [int(e["size"]) for p, e in files.items() if p.endswith(".safetensors")]
    return sum(sizes) or None


def _weights_from_index(model_dir: Path) -> int | None:
    try:
        data = json.loads((model_dir / "model.safetensors.index.json").read_text())
        return int(data["metadata"]["total_size"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_metadata(model_dir: Path) -> ModelMetadata | None:
    """``config.json`` and the weights' size from a local model directory, or None if absent.

    Sizes come from the manifest, else the safetensors index, else the files on disk.
    """
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AlbertError(
            f"{model_dir / 'config.json'} cannot be read as JSON ({exc}). Fix: download the model "
            "again (albert models download) or remove the directory."
        ) from None
    size = _weights_from_manifest(model_dir) or _weights_from_index(model_dir)
    if size is None:
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) or None
    return ModelMetadata(config, size, str(model_dir))
