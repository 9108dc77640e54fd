"""A vLLM-CPU "OpenAI server" base image and a tiny model, both made from local material only.

``albert-test/vllm-cpu:0.32.0`` plays the upstream ``vllm/vllm-openai`` image: the Python image
plus ``libnuma1`` and the vllm-cpu venv copied from ``/opt/albert/vllm-venv`` (made with
``/usr/bin/python3``, the same Debian 3.11 as the image's), with the upstream entrypoint
(``python3 -m vllm.entrypoints.openai.api_server``). The venv is copied by a container that
mounts it read-only and is then committed, so 3.5 GB never travel as a build context.

The tiny model is a random 2-layer Llama (head size 64, as vLLM CPU requires) with a 512-token
byte-level BPE tokenizer and a chat template: starts in seconds, answers gibberish, which is all
a serving test needs. Both are cached (image in dockerd, model under ``$ALBERT_TEST_CACHE``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.images import (
    CACHE,
    ROOT_SOCKET,
    build,
    build_lock,
    docker,
    ensure_python_image,
    fetch_debs,
    image_exists,
)

VLLM_VENV = Path("/opt/albert/vllm-venv")
VLLM_CPU_IMAGE = "albert-test/vllm-cpu:0.32.0"
TINY_MODEL_DIR = CACHE / "models" / "tiny-llama"
_DONE = ".albert-complete"
_PATH = f"{VLLM_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def vllm_available() -> bool:
    probe = [str(VLLM_VENV / "bin" / "python"), "-c", "import vllm"]
    return VLLM_VENV.exists() and subprocess.run(probe, capture_output=True).returncode == 0


def ensure_vllm_cpu_image(socket: str = ROOT_SOCKET) -> str:
    """The vllm-cpu base image (~2-4 min once: copying and committing the 3.5 GB venv)."""
    ensure_python_image(socket)
    with build_lock("vllm-cpu-image"):
        if image_exists(VLLM_CPU_IMAGE, socket):
            return VLLM_CPU_IMAGE
        stage = "albert-test/vllm-cpu:libs"
        with tempfile.TemporaryDirectory(prefix="albert-vllm-image-") as tmp:
            context = Path(tmp)
            fetch_debs(("libnuma1",), context / "debs")
            (context / "Dockerfile").write_text(
                "FROM albert-test/python:bookworm\n"
                "COPY debs /tmp/debs\n"
                "RUN apt-get install -y -qq --no-install-recommends /tmp/debs/*.deb "
                "&& rm -rf /tmp/debs /var/lib/apt/lists/* /var/cache/apt/*\n"
            )
            build(context, stage, socket)
        name = "albert-test-vllm-copy"
        subprocess.run(["docker", "-H", f"unix://{socket}", "rm", "-f", name], capture_output=True)
        try:
            docker("run", "--name", name, "--network", "none",
                   "-v", f"{VLLM_VENV}:/mnt/venv:ro", stage,
                   "sh", "-c", f"mkdir -p {VLLM_VENV.parent} && cp -a /mnt/venv {VLLM_VENV}",
                   socket=socket)
            docker("commit",
                   "--change", f"ENV PATH={_PATH}",
                   "--change", "WORKDIR /",
                   "--change", 'ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]',
                   "--change", "CMD []",
                   "--change", "EXPOSE 8000",
                   name, VLLM_CPU_IMAGE, socket=socket)
        finally:
            subprocess.run(["docker", "-H", f"unix://{socket}", "rm", "-f", name], capture_output=True)
    return VLLM_CPU_IMAGE


_TINY_MODEL_SCRIPT = r'''
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
words = ("the model answers questions about public services taxes health housing work "
         "school family travel citizens administration france europe help form request "
         "hello thanks please where when how what why who yes no").split()
corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
fast.chat_template = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
fast.save_pretrained(out)
config = LlamaConfig(
    vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
    bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=True,
    torch_dtype="float32")
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
'''


def ensure_tiny_model(dest: Path = TINY_MODEL_DIR) -> Path:
    """A random 2-layer Llama directory (config.json, safetensors, tokenizer), made once (~10 s)."""
    with build_lock("tiny-model"):
        if (dest / _DONE).exists():
            return dest
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(VLLM_VENV / "bin" / "python"), "-c", _TINY_MODEL_SCRIPT, str(tmp)],
                       check=True, capture_output=True, text=True)
        (tmp / _DONE).write_text("tiny random llama for tests\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest
