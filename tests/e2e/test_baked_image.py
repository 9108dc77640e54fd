"""A baked image FROM a locally built vLLM-CPU base, the tiny model inside, run as a node runs it.

``albert image build --bake-weights`` on the root-namespace dockerd, ``docker run`` with no
arguments, then the platform client: it waits while vLLM loads, ``GET /v1/models`` lists the
routing-table id, and a chat completion returns text. ~1-2 min here (vLLM start, eager mode).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pyalbert.cli import main
from pyalbert.client import Backoff, PlatformClient
from tests.support.images import docker, ensure_dockerd
from tests.support.registry import free_port
from tests.support.vllm_image import ensure_tiny_model, ensure_vllm_cpu_image, vllm_available

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("dockerd") or not vllm_available(),
    reason="needs root, dockerd and the vllm-cpu venv in /opt/albert/vllm-venv",
)

ENV = """
storage_dir = "{storage}"
[images]
vllm = "{base}"
[[hosts]]
name = "cpu"
address = "127.0.0.1"
gpus = 0
[vllm]
extra_args = ["--enforce-eager", "--dtype", "float32"]
[deploy]
ready_timeout_s = 300
"""


def test_baked_image_serves_models_and_chat(config_factory, tmp_path: Path, capsys):
    ensure_dockerd()
    base = ensure_vllm_cpu_image()
    weights = ensure_tiny_model()
    config_factory.env(ENV.format(storage=weights.parent, base=base))
    config_factory.routing({"tiny-chat": {
        "model": "albert-test/tiny-llama", "port": 8001, "max_model_len": 512,
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
    }})
    unique = uuid.uuid4().hex[:8]
    tag, container = f"albert-test/baked-tiny-vllm:{unique}", f"albert-test-baked-vllm-{unique}"
    try:
        assert main(["image", "build", "--env", "test", "--config-dir", str(config_factory.root),
                     "--model", "tiny-chat", "--bake-weights", "--weights-dir", str(weights),
                     "--tag", tag]) == 0
        assert f"built {tag}" in capsys.readouterr().out
        port = free_port()
        docker("run", "-d", "--name", container, "--shm-size", "1g",
               "-p", f"127.0.0.1:{port}:8000", tag)
        waits = []
        with PlatformClient(f"http://127.0.0.1:{port}", iam_token="unused-by-vllm",
                            backoff=Backoff(initial=1, maximum=5, deadline=300),
                            on_wait=lambda reason, delay, left: waits.append(reason)) as client:
            try:
                assert client.models() == ["tiny-chat"]
            except Exception:
                logs = subprocess.run(["docker", "logs", "--tail", "40", container],
                                      capture_output=True, text=True)
                pytest.fail(f"no /v1/models: {logs.stdout}{logs.stderr}")
            answer = client.chat("tiny-chat", "hello, who are you?", max_tokens=8,
                                 temperature=0, min_tokens=4)
        text = answer["choices"][0]["message"]["content"]
        assert isinstance(text, str) and text.strip()
        assert answer["usage"]["completion_tokens"] >= 4
        assert waits, "the client should have waited while vLLM loaded"
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
