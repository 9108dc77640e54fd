"""Answers of any size through the real gateway (uvicorn, real sockets) from a real upstream.

Issue 14 §1: a non-streamed answer larger than the upstream client's read high-water mark
(256 KiB) never arrived. The matrix: bodies from 0 B to 64 MiB, Content-Length and chunked
framing, instant and slow upstreams, plain and streamed, ``n > 1``; clients: httpx (bytes
compared exactly) and the openai client.
"""

from __future__ import annotations

import io

import httpx
import openai
import orjson
import pytest

from pyalbert.api.answers import Answers
from pyalbert.api.app import Gateway
from pyalbert.api.settings import GatewaySettings
from pyalbert.api.upstream import HIGH_WATER
from tests.support.fake_upstream import FakeUpstream, GatewayServer

KiB, MiB = 1024, 1024 * 1024
SIZES = [0, 1, 64 * KiB, HIGH_WATER - 1, HIGH_WATER + 1, 1 * MiB, 8 * MiB, 64 * MiB]
SIZE_IDS = ["0B", "1B", "64KiB", "hw-1", "hw+1", "1MiB", "8MiB", "64MiB"]


@pytest.fixture(scope="module")
def served():
    with FakeUpstream() as fake:
        # a short total timeout: a stalled answer fails in seconds, not after the default 600 s
        settings = GatewaySettings(backends={"m": [fake.url]}, open_access=True,
                                   total_timeout_s=15, first_byte_timeout_s=15, access_log=False)
        app = Gateway(settings, answers=Answers("off"), log_stream=io.BytesIO())
        with GatewayServer(app) as server:
            yield fake, server


@pytest.fixture
def fake(served):
    served[0].reset()
    return served[0]


@pytest.fixture
def url(served):
    return served[1].url


def completion(size: int, n: int = 1) -> bytes:
    """A chat completion of exactly ``size`` bytes with ``n`` choices (raw filler if too small)."""
    def build(pad: int) -> bytes:
        choices = [{"index": i, "message": {"role": "assistant", "content": "x" * (pad // n)},
                    "finish_reason": "stop"} for i in range(n)]
        return orjson.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                             "choices": choices, "usage": {"prompt_tokens": 1,
                                                           "completion_tokens": 2,
                                                           "total_tokens": 3}})

    base = len(build(0))
    if size < base + n:
        return b"x" * size
    body = build((size - base) // n * n)
    return body + b" " * (size - len(body))  # JSON allows trailing whitespace


def stream_events(size: int, n: int = 1, events: int = 8) -> list[bytes]:
    """SSE events totalling about ``size`` bytes, for ``n`` choices, then ``[DONE]``."""
    if size == 0:
        return []  # an empty stream
    per_event = max(0, size // max(1, events * n) - 120)
    out = []
    for e in range(events):
        for i in range(n):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": i, "delta": {"content": f"{e}:" + "y" * per_event},
                                  "finish_reason": None}]}
            out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


PACES = {"instant": {}, "slow": {"pieces": 8, "piece_delay": 0.02, "chunk_delay": 0.01}}


def set_pace(fake: FakeUpstream, pace: str) -> None:
    for name, value in PACES[pace].items():
        setattr(fake, name, value)


@pytest.mark.parametrize("pace", list(PACES))
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_plain_answer_of_any_size_arrives_whole(fake, url, size, framing, pace):
    fake.raw_body = completion(size)
    fake.framing = framing
    set_pace(fake, pace)
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) == size
    assert r.content == fake.raw_body


@pytest.mark.parametrize("pace", list(PACES))
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_streamed_answer_of_any_size_arrives_whole(fake, url, size, framing, pace):
    fake.raw_events = stream_events(size)
    fake.framing = framing
    set_pace(fake, pace)
    received = bytearray()
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"model": "m", "stream": True, "messages": []}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for piece in r.iter_raw():
            received += piece
    assert bytes(received) == b"".join(fake.raw_events)


@pytest.mark.parametrize("size", [HIGH_WATER + 1, 4 * MiB], ids=["hw+1", "4MiB"])
def test_stream_requested_but_answered_plain_arrives(fake, url, size):
    """``stream: true`` answered with JSON (vLLM's errors, some proxies): relayed as plain."""
    fake.raw_body = completion(size)
    fake.framing = "chunked"
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "m", "stream": True, "messages": []})
    assert r.status_code == 200 and r.content == fake.raw_body


@pytest.mark.parametrize("size", [HIGH_WATER + 1, 2 * MiB], ids=["hw+1", "2MiB"])
def test_embeddings_batch_larger_than_the_high_water_mark(fake, url, size):
    """RAG clients batch embeddings: a 641 KB answer gave a 504 (issue 14)."""
    count = 64
    dims = size // count // 17 + 1  # "0.123456789012345," is 18 bytes
    fake.raw_body = orjson.dumps({"object": "list", "model": "m", "data": [
        {"object": "embedding", "index": i, "embedding": [0.123456789012345] * dims}
        for i in range(count)], "usage": {"prompt_tokens": count, "total_tokens": count}})
    assert len(fake.raw_body) > HIGH_WATER
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused-key", max_retries=0, timeout=60)
    out = client.embeddings.create(model="m", input=[f"text {i}" for i in range(count)])
    assert len(out.data) == count and len(out.data[0].embedding) == dims


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_client_n_choices_large_answers(fake, url, n, stream):
    size = 3 * MiB
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused-key", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "hi"}]
    if not stream:
        fake.raw_body = completion(size, n)
        fake.pieces, fake.piece_delay = 4, 0.01
        answer = client.chat.completions.create(model="m", messages=messages, n=n)
        assert len(answer.choices) == n
        expected = orjson.loads(fake.raw_body)["choices"]
        assert [c.message.content for c in answer.choices] == [c["message"]["content"] for c in expected]
        return
    fake.raw_events = stream_events(size, n)
    fake.chunk_delay = 0.005
    texts = [""] * n
    for chunk in client.chat.completions.create(model="m", messages=messages, n=n, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(len(t) > size // (2 * n) for t in texts)
    assert texts[0] == texts[-1]  # every choice got every event


def test_gateway_still_serves_after_large_answers(fake, url):
    fake.raw_body = completion(HIGH_WATER * 3)
    with httpx.Client(timeout=60) as client:
        for _ in range(3):  # keep-alive connections to the upstream are reused after a large body
            r = client.post(url + "/v1/chat/completions", json={"model": "m", "messages": []})
            assert r.status_code == 200 and r.content == fake.raw_body
        fake.reset()
        r = client.post(url + "/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
