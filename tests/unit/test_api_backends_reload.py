"""The gateway's backends change while it runs (routes folder): reload, drain, 503 + Retry-After."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.api.app import Gateway
from pyalbert.api.backends_reload import Route, effective_backends, parse_route, read_routes
from pyalbert.api.settings import GatewaySettings
from tests.support.fake_upstream import FakeUpstream, GatewayServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("text, route", [
    ('{"model": "m", "base": "http://a:1/", "url": "http://a:2", "retry_after": 7}',
     Route("m", "http://a:1", "http://a:2", 7)),
    ('{"model": "m", "base": "http://a:1", "url": null}', Route("m", "http://a:1", None, 5)),
    ('{"model": "m", "base": "http://a:1", "url": "ftp://x"}', None),
    ('{"model": "m"}', None),
    ("not json", None),
], ids=["moved", "out-of-rotation", "not-http", "no-base", "garbage"])
def test_parse_route(text, route):
    assert parse_route(text) == route


def test_effective_backends_moves_removes_and_keeps():
    base = {"m": ("http://h1:8000", "http://h2:8000"), "n": ("http://h1:8001",)}
    routes = [Route("m", "http://h1:8000", "http://h1:26000"),
              Route("n", "http://h1:8001", None, 9),
              Route("ghost", "http://h9:1", "http://h9:2")]
    assert effective_backends(base, routes) == (
        {"m": ("http://h1:26000", "http://h2:8000"), "n": ()}, {"n": 9})
    assert effective_backends(base, []) == (
        {"m": ("http://h1:8000", "http://h2:8000"), "n": ("http://h1:8001",)}, {})


def test_read_routes_skips_what_is_not_a_route(tmp_path: Path):
    (tmp_path / "a.json").write_text('{"model": "m", "base": "http://a:1", "url": null}')
    (tmp_path / "b.json").write_text("{half")
    (tmp_path / "c.tmp").write_text('{"model": "m", "base": "http://a:2", "url": null}')
    assert read_routes(str(tmp_path)) == [Route("m", "http://a:1", None)]
    assert read_routes(str(tmp_path / "missing")) == []


def write_route(folder: Path, name: str, base: str, url: str | None, retry_after: int = 5) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps({"model": "m", "base": base, "url": url, "retry_after": retry_after}))
    os.replace(tmp, folder / f"{name}.json")


@pytest.fixture
def two():
    with FakeUpstream(models=("m",)) as old, FakeUpstream(models=("m",)) as new:
        yield old, new


def start(old: FakeUpstream, routes: Path) -> tuple[Gateway, GatewayServer]:
    app = Gateway(GatewaySettings(backends={"m": [old.url]}, open_access=True, probe_interval_s=0.05,
                                  routes_dir=str(routes), routes_poll_s=0.05, access_log=False))
    return app, GatewayServer(app).__enter__()


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_moved_replica_takes_new_requests_and_the_old_one_finishes_its_stream(two, tmp_path):
    old, new = two
    old.chunk_delay = 0.1  # a stream of ~0.7 s in flight on the old replica during the switch
    app, server = start(old, tmp_path)
    try:
        chunks: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", server.url + "/v1/chat/completions",
                              json={**CHAT, "stream": True}, timeout=10) as r:
                chunks.extend(line for line in r.iter_lines() if line.startswith("data: "))

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: old.in_flight == 1, "the stream reached the old replica")
        write_route(tmp_path, "albert-x-vllm-m", old.url, new.url)
        wait_for(lambda: [r.url for r in app.router.models["m"]] == [new.url], "reloaded")
        for _ in range(3):  # new requests: the new replica only
            assert httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        t.join(10)
        assert chunks[-1] == "data: [DONE]"  # the stream on the removed replica finished whole
        assert old.in_flight == 0 and len(old.requests) == 1 and len(new.requests) == 3
    finally:
        server.stop(wait=False)


def test_model_out_of_rotation_is_503_with_retry_after_then_back(two, tmp_path):
    old, new = two
    app, server = start(old, tmp_path)
    try:
        write_route(tmp_path, "albert-x-vllm-m", old.url, None, retry_after=7)
        wait_for(lambda: app.router.models["m"] == [], "out of rotation")
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "model_unavailable" and not old.requests
        write_route(tmp_path, "albert-x-vllm-m", old.url, new.url)
        wait_for(lambda: len(app.router.models["m"]) == 1, "back in rotation")
        assert httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
        assert len(new.requests) == 1
    finally:
        server.stop(wait=False)


def test_removing_the_route_file_goes_back_to_the_release_backends(two, tmp_path):
    old, new = two
    app, server = start(old, tmp_path)
    try:
        write_route(tmp_path, "r", old.url, new.url)
        wait_for(lambda: [r.url for r in app.router.models["m"]] == [new.url], "moved")
        (tmp_path / "r.json").unlink()
        wait_for(lambda: [r.url for r in app.router.models["m"]] == [old.url], "back to base")
    finally:
        server.stop(wait=False)
