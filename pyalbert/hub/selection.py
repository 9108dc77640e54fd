"""Which files of a hub repo vLLM needs: pure functions on file names.

vLLM reads ``config.json``, tokenizer files, generation config and *one* weight format
(safetensors if present, else ``*.bin``/``*.pt``; GGUF only for ``quantization = "gguf"``).
Everything else (original checkpoints, other frameworks' weights, ONNX exports...) is skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from pyalbert.config.routing import ModelSpec

#: bump when the rules below change: installed models then count as outdated
POLICY = "vllm-1"

#: never read by vLLM
ALWAYS_SKIPPED = (
    "original/*",  # Meta's original checkpoints (consolidated.*.pth)
    "*.pth",
    "*.msgpack",  # flax
    "*.h5",  # tensorflow
    "*.ot",  # rust-bert
    "*.tflite",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "*.mlmodel",
    "*.mlpackage/*",
    "*.npz",
    "*.ckpt",
    ".gitattributes",
)
TORCH_WEIGHTS = ("*.bin", "*.pt")
#: Mistral's native format, next to the HF-format shards; only read with --load-format mistral
MISTRAL_NATIVE = ("consolidated*.safetensors",)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def ignore_patterns(model: ModelSpec, repo_files: Iterable[str]) -> list[str]:
    """The ignore patterns for ``model`` given the repo's file list (order: most general first)."""
    files = list(repo_files)
    patterns = list(ALWAYS_SKIPPED)
    if model.quantization != "gguf":
        patterns.append("*.gguf")
    hf_safetensors = [
        f for f in files if f.endswith(".safetensors") and not _matches(f, MISTRAL_NATIVE)
    ]
    mistral_format = any("mistral" in a for a in model.extra_args)
    if hf_safetensors or any(f.endswith(".safetensors") for f in files):
        # safetensors win: skip duplicated torch pickles (training_args.bin etc. included)
        patterns.extend(TORCH_WEIGHTS)
    if hf_safetensors and not mistral_format:
        patterns.extend(MISTRAL_NATIVE)
    return patterns


def select_files(model: ModelSpec, repo_files: Iterable[str]) -> tuple[list[str], list[str]]:
    """(kept, skipped) file paths, each in the input order."""
    files = list(repo_files)
    patterns = ignore_patterns(model, files)
    kept = [f for f in files if not _matches(f, patterns)]
    skipped = [f for f in files if _matches(f, patterns)]
    return kept, skipped


def selection_key(model: ModelSpec) -> str:
    """What the selection depends on besides the repo content (stored in the manifest)."""
    fmt = "gguf" if model.quantization == "gguf" else "hf"
    mistral = "+mistral" if any("mistral" in a for a in model.extra_args) else ""
    return f"{POLICY}:{fmt}{mistral}"
