"""The upstream client (pool, timeouts, stale connections) and the SSE rewriter, in one loop."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest

from pyalbert.api.answers import Answers
from pyalbert.api.upstream import HIGH_WATER, ConnectFailed, Pool, UpstreamBroken, UpstreamTimeout
from pyalbert.whitelist import matcher
from tests.support.fake_upstream import FakeUpstream

CHAT = orjson.dumps({"model": "m", "messages": []})


def run(coro_fn):
    async def main():
        fake = FakeUpstream()
        await fake.serve()
        try:
            return await coro_fn(fake)
        finally:
            await fake.close()

    return asyncio.run(main())


def test_sequential_requests_reuse_one_connection():
    async def go(fake):
        pool = Pool(fake.url)
        for _ in range(3):
            resp = await pool.request(b"POST", b"/v1/chat/completions", CHAT)
            assert resp.status == 200
            assert orjson.loads(await resp.read())["model"] == "m"
            resp.close()
        assert len(pool.idle) == 1

    run(go)


def test_stream_chunks_arrive_before_the_end():
    async def go(fake):
        fake.chunk_delay = 0.02
        pool = Pool(fake.url)
        resp = await pool.request(b"POST", b"/v1/chat/completions",
                                  orjson.dumps({"model": "m", "stream": True}))
        assert resp.headers[b"content-type"].startswith(b"text/event-stream")
        pieces = []
        while (chunk := await resp.next_chunk()) is not None:
            pieces.append(chunk)
        resp.close()
        assert len(pieces) >= 5 and b"".join(pieces).endswith(b"data: [DONE]\n\n")
        assert len(pool.idle) == 1  # read to the end: reusable

    run(go)


def test_connect_failure_and_timeouts():
    async def go(fake):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(ConnectFailed, match=f"127.0.0.1:{free}"):
            await Pool(f"http://127.0.0.1:{free}").request(b"GET", b"/v1/models")
        fake.latency = 1.0
        pool = Pool(fake.url)
        with pytest.raises(UpstreamTimeout, match="response head from the upstream within 0.05 s"):
            await pool.request(b"POST", b"/v1/chat/completions", CHAT, first_byte_timeout=0.05)
        assert not pool.idle  # a timed-out connection is dropped
        fake.latency, fake.chunk_delay = 0.0, 0.05
        resp = await pool.request(b"POST", b"/v1/chat/completions",
                                  orjson.dumps({"model": "m", "stream": True}), total_timeout=0.1)
        with pytest.raises(UpstreamTimeout, match="complete response"):
            while await resp.next_chunk() is not None:
                pass
        resp.close()

    run(go)


def test_stale_keep_alive_connection_is_replaced_silently():
    async def go(fake):
        pool = Pool(fake.url)
        resp = await pool.request(b"POST", b"/v1/chat/completions", CHAT)
        await resp.read()
        resp.close()
        conn = pool.idle[0]
        conn.received = False
        # the server closes idle connections behind our back; the client only notices on use
        fake.drop_connections()
        await asyncio.sleep(0)  # not enough for connection_lost to be delivered in every loop
        resp = await pool.request(b"POST", b"/v1/chat/completions", CHAT)
        assert resp.status == 200
        resp.close()

    run(go)


def test_mid_stream_close_is_upstream_broken():
    async def go(fake):
        fake.close_after = 2
        pool = Pool(fake.url)
        resp = await pool.request(b"POST", b"/v1/chat/completions",
                                  orjson.dumps({"model": "m", "stream": True}))
        with pytest.raises(UpstreamBroken):
            while await resp.next_chunk() is not None:
                pass
        resp.close()
        assert not pool.idle

    run(go)


def test_whole_body_past_the_high_water_mark_is_read_to_its_end():
    """read() once waited forever: reading paused at HIGH_WATER and nothing resumed it."""
    async def go(fake):
        fake.raw_body = b"x" * (HIGH_WATER * 4)
        fake.pieces, fake.piece_delay = 16, 0.005
        pool = Pool(fake.url)
        resp = await pool.request(b"POST", b"/v1/chat/completions", CHAT, total_timeout=10)
        await asyncio.sleep(0.2)  # the replica sends while nobody reads yet
        assert await asyncio.wait_for(resp.read(), 10) == fake.raw_body
        resp.close()
        fake.raw_body, fake.pieces = None, 1
        # the connection went back to the pool reading: the next answer on it arrives
        resp = await pool.request(b"POST", b"/v1/chat/completions", CHAT, first_byte_timeout=5)
        assert orjson.loads(await resp.read())["model"] == "m"
        resp.close()

    run(go)


def test_stream_paused_for_a_slow_reader_resumes_and_its_connection_is_reusable():
    async def go(fake):
        event = b"data: " + orjson.dumps({"pad": "y" * 4096}) + b"\n\n"
        fake.raw_events = [event] * ((HIGH_WATER * 3) // len(event))
        pool = Pool(fake.url)
        resp = await pool.request(b"POST", b"/v1/chat/completions",
                                  orjson.dumps({"model": "m", "stream": True}), total_timeout=10)
        await asyncio.sleep(0.2)  # a slow client: everything the replica sent waits here
        assert resp._paused
        got = bytearray()
        while (chunk := await asyncio.wait_for(resp.next_chunk(), 10)) is not None:
            got += chunk
        assert bytes(got) == b"".join(fake.raw_events)
        resp.close()
        fake.raw_events = None
        resp = await pool.request(b"POST", b"/v1/chat/completions", CHAT, first_byte_timeout=5)
        assert resp.status == 200 and await resp.read()
        resp.close()

    run(go)


def _events(chunks: list[str]) -> bytes:
    head = b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":['
    out = [head + b'{"index":0,"delta":{"content":%s},"finish_reason":null}]}' % orjson.dumps(c)
           for c in chunks]
    return b"".join(b"data: " + e + b"\n\n" for e in out) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("cut", [1, 7, 50, 10_000], ids=lambda c: f"pieces-of-{c}")
def test_sse_rewriter_is_independent_of_tcp_chunking(cut):
    wl = matcher.Whitelist.from_entries(domains=["ok.fr"])
    raw = _events(["Go to http", "s://bad.exa", "mple/p now, or ", "see https://ok.fr/x ", "end"])
    rewriter = Answers("redact", wl, matcher).stream(chat=True)
    out = b"".join(rewriter.feed(raw[i:i + cut]) for i in range(0, len(raw), cut)) + rewriter.finish()
    events = [e[6:] for e in out.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    text = "".join(c["delta"]["content"] for e in events[:-1] for c in orjson.loads(e)["choices"])
    assert text == matcher.postprocess("Go to https://bad.example/p now, or see https://ok.fr/x end",
                                       wl, "redact")[0]
    assert "bad.example" not in text and "https://ok.fr/x" in text
