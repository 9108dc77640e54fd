"""The gateway end to end in-process: uvicorn in a thread, fake upstreams on 127.0.0.1, httpx."""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import socket
import string
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest

from pyalbert.api.answers import Answers
from pyalbert.api.app import Gateway
from pyalbert.api.keys import hash_key
from pyalbert.api.settings import GatewaySettings
from pyalbert.whitelist import matcher
from tests.support.fake_upstream import FakeUpstream, GatewayServer

KEY = "k-test-0123456789abcdef"
LIMITED = "k-limited-0123456789abcdef"
SCRAPE = "k-scrape-0123456789abcdef"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "secret prompt 42"}]}


@pytest.fixture(scope="module")
def fakes():
    with FakeUpstream() as a, FakeUpstream() as b:
        yield a, b


@pytest.fixture
def up(fakes):
    for fake in fakes:
        fake.reset()
    return fakes


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - {{name: main, sha256: {hash_key(KEY)}, models: ['*']}}\n"
        f"  - name: limited\n    sha256: {hash_key(LIMITED)}\n    models: [m]\n"
        "    requests_per_minute: 2\n    max_tokens: 50\n"
        f"  - {{name: prometheus, sha256: {hash_key(SCRAPE)}, models: [], scrape: true}}\n"
    )
    return path


#: one client for every test (creating an httpx.Client costs ~40 ms: it loads the CA bundle)
HTTP = httpx.Client(timeout=10)


class Api:
    """``HTTP`` bound to one gateway and the main key."""

    def __init__(self, base: str):
        self.base = base

    def request(self, method: str, path: str, headers: dict | None = None, **kw):
        return HTTP.request(method, self.base + path,
                            headers={"Authorization": f"Bearer {KEY}", **(headers or {})}, **kw)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw):
        return self.request("POST", path, **kw)

    def stream(self, method: str, path: str, **kw):
        return HTTP.stream(method, self.base + path, headers={"Authorization": f"Bearer {KEY}"}, **kw)


class Running:
    def __init__(self, gateway: Gateway, server: GatewayServer, log: io.BytesIO):
        self.gateway, self.server, self.log = gateway, server, log
        self.client = Api(server.url)

    def log_lines(self) -> list[dict]:
        self.gateway.log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def wait_ready(self, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, self.client.get("/ready").text
            time.sleep(0.02)


@pytest.fixture
def gateway(up, keys_file):
    """Start a gateway: ``gateway(backends=..., answers=..., **settings)``."""
    stack = []

    def start(backends=None, answers=None, **settings) -> Running:
        a, b = up
        backends = backends or {"m": [a.url, b.url], "solo": [a.url]}
        settings.setdefault("keys_path", str(keys_file))
        settings.setdefault("probe_interval_s", 0.05)
        log = io.BytesIO()
        app = Gateway(GatewaySettings(backends=backends, **settings), answers=answers, log_stream=log)
        server = GatewayServer(app).__enter__()
        running = Running(app, server, log)
        stack.append(running)
        return running

    yield start
    for running in stack:
        running.server.stop(wait=False)


# -- happy paths ---------------------------------------------------------------------------------

def test_chat_plain_is_relayed_with_whitelist_header(gateway, up):
    gw = gateway()
    r = gw.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["x-albert-whitelist"] == "off; entries=0"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "worda wordb wordc wordd worde "
    assert "albert" not in body
    assert sum(len(f.requests) for f in up) == 1


def test_stream_is_relayed_chunk_by_chunk(gateway, up):
    up[0].chunk_delay = up[1].chunk_delay = 0.05
    gw = gateway()
    arrivals = []
    with gw.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line[6:]))
    assert arrivals[-1][1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["delta"].get("content", "") for _, p in arrivals[:-1]]
    assert "".join(texts) == "worda wordb wordc wordd worde "
    # not buffered: the events arrive spread over the upstream's pace, not all at the end
    assert arrivals[-1][0] - arrivals[0][0] > 0.2


def test_completions_and_embeddings(gateway):
    gw = gateway()
    r = gw.client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("worda")
    r = gw.client.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_models_health_ready_metrics(gateway, up):
    up[1].refuse()
    try:
        gw = gateway(backends={"m": [up[0].url], "down": [up[1].url]})
        assert gw.client.get("/health", headers={}).json() == {"status": "ok"}
        deadline = time.monotonic() + 5
        while not gw.gateway.router.models["m"][0].healthy:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready = HTTP.get(gw.server.url + "/ready")  # no key needed
        assert ready.status_code == 503
        assert ready.json()["healthy_replicas"] == {"m": 1, "down": 0}
        models = gw.client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["m"]
        assert HTTP.get(gw.server.url + "/v1/models").status_code == 401
        gw.client.post("/v1/chat/completions", json=CHAT)
        metrics = HTTP.get(gw.server.url + "/metrics", headers=SCRAPER).text
        assert 'albert_requests_total{route="chat",model="m",status="200"} 1' in metrics
        assert 'albert_replica_healthy{model="down"' in metrics
    finally:
        up[1].accept()
    deadline = time.monotonic() + 5
    while HTTP.get(gw.server.url + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "the probe did not bring the replica back"
        time.sleep(0.02)


# -- auth, limits ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "status", "code"), [
    ({}, 401, "invalid_api_key"),
    ({"Authorization": "Bearer wrong-key-0123456789"}, 401, "invalid_api_key"),
    ({"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
], ids=["missing", "wrong", "not-bearer"])
def test_bad_keys_are_401_in_openai_shape(gateway, up, headers, status, code):
    gw = gateway()
    r = HTTP.post(gw.server.url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert r.headers["x-albert-whitelist"] == "off; entries=0"
    assert not any(f.requests for f in up)


def test_key_models_rate_limit_and_max_tokens_cap(gateway, up):
    gw = gateway()
    limited = {"Authorization": f"Bearer {LIMITED}"}
    r = gw.client.post("/v1/chat/completions", json={**CHAT, "model": "solo"}, headers=limited)
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    r = gw.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500}, headers=limited)
    assert r.status_code == 200
    r = gw.client.post("/v1/chat/completions", json=CHAT, headers=limited)
    assert r.status_code == 200
    sent = [body for f in up for _, body in f.requests]
    assert sorted(b["max_tokens"] for b in sent) == [50, 50]  # lowered, and set when absent
    r = gw.client.post("/v1/chat/completions", json=CHAT, headers=limited)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    # another key is not affected
    assert gw.client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_rejections_are_counted_per_key_name_status_and_reason_never_the_secret(gateway, up):
    gw = gateway(max_body_bytes=1024)
    limited = {"Authorization": f"Bearer {LIMITED}"}
    HTTP.post(gw.server.url + "/v1/chat/completions", json=CHAT)  # no key
    HTTP.post(gw.server.url + "/v1/chat/completions", json=CHAT,
              headers={"Authorization": "Bearer wrong-key-0123456789"})
    gw.client.post("/v1/chat/completions", json={**CHAT, "model": "solo"}, headers=limited)
    for _ in range(3):  # 2 requests per minute: the third is a 429
        gw.client.post("/v1/chat/completions", json=CHAT, headers=limited)
    gw.client.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 2048})
    gw.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": "many"})
    gw.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = HTTP.get(gw.server.url + "/metrics", headers=SCRAPER).text
    counted = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines()
               if line.startswith("albert_rejections_total{")}
    assert counted == {
        'albert_rejections_total{key="",status="401",reason="invalid_api_key"}': "2",
        'albert_rejections_total{key="limited",status="403",reason="model_not_allowed"}': "1",
        'albert_rejections_total{key="limited",status="429",reason="rate_limit_exceeded"}': "1",
        'albert_rejections_total{key="main",status="413",reason="request_too_large"}': "1",
        'albert_rejections_total{key="main",status="400",reason="invalid_type"}': "1",
        'albert_rejections_total{key="main",status="404",reason="model_not_found"}': "1",
    }
    assert LIMITED not in text and KEY not in text and "wrong-key" not in text


def sent_bodies(up) -> list[dict]:
    return [body for f in up for _, body in f.requests]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("raw", [b"100000", b"100000.0", b"1e5", b"1E+5"],
                         ids=["int", "float", "exponent", "exponent-upper"])
def test_token_caps_hold_for_every_json_number_spelling(gateway, up, field, raw):
    """100000.0 and 1e5 passed uncapped: the cap looked at Python ints only (issue 14)."""
    gw = gateway(max_tokens_cap=64)
    body = b'{"model": "m", "messages": [], "%s": %s}' % (field.encode(), raw)
    r = gw.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200
    (sent,) = sent_bodies(up)
    assert sent[field] == gw.gateway.settings.max_tokens_cap and type(sent[field]) is int


@pytest.mark.parametrize("raw", [b"64.0", b"6.4e1"], ids=["float", "exponent"])
def test_integral_numbers_under_the_cap_are_forwarded_as_integers(gateway, up, raw):
    gw = gateway(max_tokens_cap=100)
    body = b'{"model": "m", "prompt": "x", "max_tokens": %s, "n": 2.0}' % raw
    assert gw.client.post("/v1/completions", content=body).status_code == 200
    (sent,) = sent_bodies(up)
    assert (sent["max_tokens"], sent["n"]) == (64, 2)
    assert type(sent["max_tokens"]) is int and type(sent["n"]) is int


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n", "best_of"])
@pytest.mark.parametrize("value", ['"100000"', "true", "1.5", "0", "-3", "[]", "{}", '"x"'],
                         ids=["string", "bool", "fraction", "zero", "negative", "list", "object",
                              "text"])
def test_garbage_counts_are_a_400_naming_the_field(gateway, up, field, value):
    gw = gateway(max_tokens_cap=64)
    body = b'{"model": "m", "messages": [], "%s": %s}' % (field.encode(), value.encode())
    r = gw.client.post("/v1/chat/completions", content=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error"
    assert err["code"] in ("invalid_type", "integer_below_min_value")
    assert field in err["message"]
    assert not sent_bodies(up)  # nothing reached a replica


def test_n_is_capped_by_the_environment_and_the_key(gateway, up, tmp_path):
    keys = tmp_path / "n.json"
    small = "k-small-n-0123456789abcdef"
    keys.write_text(json.dumps([{"name": "main", "sha256": hash_key(KEY)},
                                {"name": "small", "sha256": hash_key(small), "max_n": 2}]))
    gw = gateway(backends={"m": [up[0].url]}, keys_path=str(keys), max_n_cap=4)
    for n, headers in ((10, {}), (1e1, {}), (3, {"Authorization": f"Bearer {small}"})):
        r = gw.client.post("/v1/chat/completions", json={**CHAT, "n": n, "best_of": n}, headers=headers)
        assert r.status_code == 200
    caps = [gw.gateway.settings.max_n_cap, gw.gateway.settings.max_n_cap, 2]
    assert [(b["n"], b["best_of"]) for b in sent_bodies(up)] == [(c, c) for c in caps]
    r = gw.client.post("/v1/chat/completions", json={**CHAT, "n": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def tpm_gateway(gateway, tmp_path, per_minute: int, **settings):
    keys = tmp_path / "tpm.json"
    keys.write_text(json.dumps({"keys": [{"name": "t", "sha256": hash_key(KEY),
                                          "tokens_per_minute": per_minute}]}))
    return gateway(keys_path=str(keys), **settings)


def test_tokens_per_minute_charges_the_reported_usage(gateway, up, tmp_path):
    gw = tpm_gateway(gateway, tmp_path, 100)
    used_per_request = 12  # the fake reports total_tokens 7 + 5
    admitted = 0
    while (r := gw.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})).status_code == 200:
        admitted += 1
        assert admitted < 20
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    # within the budget, and what was reserved beyond the usage was given back
    assert admitted * used_per_request <= 100
    assert admitted * used_per_request > 100 / 2
    assert gw.gateway.metrics.tokens[("t", "m")] == admitted * used_per_request
    # a request that may use more than the whole budget needs a full bucket
    r = gw.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1000})
    assert r.status_code == 429


def test_concurrent_streams_reserve_max_tokens_at_admission(gateway, up, tmp_path):
    """10 concurrent streams on a 100 tokens/min key were all admitted (issue 14)."""
    up[0].chunk_delay = up[1].chunk_delay = 0.05
    gw = tpm_gateway(gateway, tmp_path, 100)
    max_tokens = 20
    statuses = []

    def call():
        with gw.client.stream("POST", "/v1/chat/completions",
                              json={**CHAT, "stream": True, "max_tokens": max_tokens}) as r:
            statuses.append(r.status_code)
            r.read()

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = statuses.count(200)
    assert statuses.count(429) == 10 - admitted
    assert 1 <= admitted <= 100 // max_tokens


def test_streams_cut_by_the_client_are_charged(gateway, up, tmp_path):
    """6 streams cut after 60 events delivered 360 tokens on a 100 tokens/min key (issue 14)."""
    up[0].chunks = up[1].chunks = 500
    up[0].chunk_delay = up[1].chunk_delay = 0.002
    gw = tpm_gateway(gateway, tmp_path, 100)
    port = int(gw.server.url.rsplit(":", 1)[1])
    delivered = refused = 0
    for _ in range(6):
        body = orjson.dumps({**CHAT, "stream": True, "max_tokens": 90})
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            data = sock.recv(65536)
            if data.startswith(b"HTTP/1.1 429"):
                refused += 1
                continue
            assert data.startswith(b"HTTP/1.1 200")
            while data.count(b"data: {") < 60 and b"\r\n\r\n0\r\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
            delivered += data.count(b'"content":"word')
        # the gateway notices the disconnect and settles before the next attempt
        deadline = time.monotonic() + 5
        while gw.gateway.metrics.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert refused >= 1
    assert delivered <= 100  # about one cut stream's worth, not 6
    charged = gw.gateway.metrics.tokens[("t", "m")]
    assert charged >= delivered  # what was relayed was charged, though no stream completed


SCRAPER = {"Authorization": f"Bearer {SCRAPE}"}


def test_metrics_need_a_scrape_key_by_default(gateway, up):
    """/metrics was open: key names, models and replicas for anyone (issue 14)."""
    gw = gateway()
    assert gw.gateway.settings.metrics_auth
    r = HTTP.get(gw.server.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = gw.client.get("/metrics")  # a valid key, but not a scrape key
    assert r.status_code == 403 and "scrape: true" in r.json()["error"]["message"]
    r = HTTP.get(gw.server.url + "/metrics", headers=SCRAPER)
    assert r.status_code == 200 and "albert_in_flight" in r.text
    # the scrape key uses no model
    r = HTTP.post(gw.server.url + "/v1/chat/completions", json=CHAT, headers=SCRAPER)
    assert r.status_code == 403 and not sent_bodies(up)
    assert HTTP.get(gateway(metrics_auth=False).server.url + "/metrics").status_code == 200


#: one sample line of the text exposition format: name, escaped labels, value
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                       r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)?\})? \S+$')


def samples(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE_RE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        out.append((match[1], match[2] or ""))
    return out


def test_metrics_labels_are_bounded_and_cannot_inject_series(gateway):
    gw = gateway()
    evil = '/x"} 1\nalbert_fake_total{route="pwn'
    assert HTTP.get(gw.server.url + quote(evil)).status_code == 404
    assert HTTP.get(gw.server.url + "/v1/" + quote('a\\"b\n')).status_code == 404
    for _ in range(2):  # the first scrape adds the /metrics route's own series
        series_before = len(samples(HTTP.get(gw.server.url + "/metrics", headers=SCRAPER).text))
    rng = random.Random(14)
    for _ in range(300):
        path = "/" + "".join(rng.choice(string.ascii_letters + '"{}\\\n=, ') for _ in range(12))
        HTTP.get(gw.server.url + quote(path))
    text = HTTP.get(gw.server.url + "/metrics", headers=SCRAPER).text
    found = samples(text)
    assert not [name for name, _ in found if "fake" in name or "pwn" in name]
    routes = {labels.split('route="')[1].split('"')[0] for _, labels in found if 'route="' in labels}
    assert routes <= {"chat", "completions", "embeddings", "/health", "/ready", "/metrics",
                      "/v1/models", "other"}
    assert len(found) == series_before  # 300 new paths, no new series
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                               capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


# -- bad inputs --------------------------------------------------------------------------------------

def test_bad_inputs_each_get_a_clear_error_and_the_gateway_keeps_serving(gateway, up):
    gw = gateway(max_body_bytes=2048)
    post = gw.client.post
    r = post("/v1/chat/completions", content=b'{"model": "m", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400
    r = post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "m, solo" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", json={**CHAT, "pad": "x" * 5000})
    assert r.status_code == 413
    # a huge body without Content-Length (chunked upload) is cut at the limit too
    r = post("/v1/chat/completions", content=iter([b'{"model":"m","pad":"', b"x" * 4096, b'"}']))
    assert r.status_code == 413
    r = gw.client.get("/v1/chat/completions")
    assert r.status_code == 405
    r = gw.client.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    assert not any(f.requests for f in up)
    assert post("/v1/chat/completions", json=CHAT).status_code == 200


# -- routing, health, retries -------------------------------------------------------------------------

def test_least_outstanding_spreads_concurrent_requests(gateway, up):
    up[0].latency = up[1].latency = 0.3
    gw = gateway()
    gw.wait_ready()
    results = []

    def call():
        results.append(gw.client.post("/v1/chat/completions", json=CHAT).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert (len(up[0].requests), len(up[1].requests)) == (3, 3)


def test_refused_replica_is_ejected_and_the_request_retried(gateway, up):
    gw = gateway()
    gw.wait_ready()
    up[0].refuse()
    try:
        for _ in range(4):
            r = gw.client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
        assert len(up[1].requests) == 4
        replica = gw.gateway.router.models["m"][0]
        assert not replica.healthy and "connect" in replica.reason
        assert gw.gateway.metrics.retries <= 1  # ejected after the first failure
        # a model whose only replica is down: 503 with Retry-After, OpenAI shape
        r = gw.client.post("/v1/chat/completions", json={**CHAT, "model": "solo"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "model_unavailable"
    finally:
        up[0].accept()


def test_503_loading_is_retried_on_the_other_replica(gateway, up):
    gw = gateway()
    gw.wait_ready()
    up[0].status = 503
    up[1].status = 503
    r = gw.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503  # both loading: the second answer is passed through
    assert len(up[0].requests) + len(up[1].requests) == 2
    up[0].status = up[1].status = 200
    for f in up:
        f.requests.clear()
    deadline = time.monotonic() + 5
    while not all(r.healthy for r in gw.gateway.router.models["m"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    up[0].status = 503
    for _ in range(2):
        r = gw.client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
    assert gw.gateway.metrics.retries >= 1


def test_500_passes_through_and_ejects(gateway, up):
    gw = gateway(backends={"m": [up[0].url]})
    gw.wait_ready()
    up[0].status = 500
    r = gw.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "internal failure"  # vLLM's shape made OpenAI's
    assert gw.gateway.metrics.upstream_errors[("m", "http_500")] == 1  # ejected, then probed back
    up[0].status = 200
    assert gw.client.post("/v1/chat/completions", json=CHAT).status_code == 200  # panic mode


def test_first_byte_timeout_is_504(gateway, up):
    up[0].latency = 2
    gw = gateway(backends={"m": [up[0].url]}, first_byte_timeout_s=0.2)
    r = gw.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    up[0].latency = 0
    assert gw.client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_backend_dying_mid_stream_ends_with_an_error_event(gateway, up):
    up[0].close_after = 3
    gw = gateway(backends={"m": [up[0].url]})
    with gw.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(lines) == 4 and lines[-1] != "data: [DONE]"
    assert json.loads(lines[-1][6:])["error"]["code"] == "upstream_broken"
    up[0].close_after = None
    assert gw.client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_client_disconnect_cancels_the_upstream_request(gateway, up):
    gw = gateway(backends={"m": [up[0].url]})
    port = int(gw.server.url.rsplit(":", 1)[1])
    for stream, setting in ((False, "latency"), (True, "chunk_delay")):
        setattr(up[0], setting, 5.0 if not stream else 0.2)
        up[0].chunks = 100
        before = up[0].aborted
        body = orjson.dumps({**CHAT, "stream": stream})
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 5
        while up[0].in_flight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()
        while up[0].aborted == before:
            assert time.monotonic() < deadline, "the upstream request was not cancelled"
            time.sleep(0.01)
        setattr(up[0], setting, 0.0)
    assert gw.client.post("/v1/chat/completions", json=CHAT).status_code == 200
    statuses = [line["status"] for line in gw.log_lines() if "status" in line]
    assert statuses.count(499) == 2


def test_access_log_has_no_prompt_and_no_key(gateway):
    gw = gateway()
    gw.client.post("/v1/chat/completions", json=CHAT)
    gw.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = gw.log.getvalue().decode() if gw.gateway.log.flush() is None else ""
    assert "secret prompt" not in text and KEY not in text and "worda" not in text
    lines = [line for line in gw.log_lines() if line.get("path") == "/v1/chat/completions"]
    assert [(line["status"], line.get("key")) for line in lines] == [(200, "main"), (404, None)]
    assert lines[0]["model"] == "m" and lines[0]["tokens"] == 12
    assert 0 < lines[0]["ttfb_ms"] <= lines[0]["ms"] < 5000


# -- whitelist -------------------------------------------------------------------------------------------

WL = matcher.Whitelist.from_entries(domains=["service-public.fr"], emails=["contact@gouv.fr"])
REPLY = "See https://www.service-public.fr/x and https://evil.example/y or write to bad@spam.io now"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_flag_mode_reports_unverified_items(gateway, up, stream):
    up[0].reply = up[1].reply = REPLY
    gw = gateway(answers=Answers("flag", WL, matcher))
    if not stream:
        r = gw.client.post("/v1/chat/completions", json=CHAT)
        assert r.headers["x-albert-whitelist"] == "flag; entries=2"
        body = r.json()
        assert body["choices"][0]["message"]["content"] == REPLY
        unverified = body["albert"]["unverified"]
    else:
        with gw.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.headers["x-albert-whitelist"] == "flag; entries=2"
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        assert text == REPLY
        assert chunks[-1]["choices"] == [] and chunks[-1]["id"] == "cmpl-fake"
        unverified = chunks[-1]["albert"]["unverified"]
    assert unverified == [{"kind": "url", "text": "https://evil.example/y"},
                          {"kind": "email", "text": "bad@spam.io"}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_redact_mode_removes_unverified_items(gateway, up, stream):
    up[0].reply = up[1].reply = REPLY
    expected, _ = matcher.postprocess(REPLY, WL, "redact")
    assert "evil.example" not in expected
    gw = gateway(answers=Answers("redact", WL, matcher))
    if not stream:
        r = gw.client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.json()["choices"][0]["text"] == expected and "albert" not in r.json()
        return
    with gw.client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x",
                                                           "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_sighup_reload_swaps_keys_and_whitelist(gateway, tmp_path, keys_file):
    wl_file = tmp_path / "whitelist.json"
    wl_file.write_text(json.dumps({"version": 1, "entries": {"domains": ["a.fr"]}}))
    gw = gateway(whitelist_mode="flag", whitelist_path=str(wl_file))
    assert gw.client.get("/health").headers["x-albert-whitelist"] == "flag; entries=1"
    new_key = "k-new-0123456789abcdef"
    keys_file.write_text(json.dumps([{"name": "new", "sha256": hash_key(new_key)}]))
    wl_file.write_text(json.dumps({"version": 1, "entries": {"domains": ["a.fr", "b.fr"]}}))
    assert gw.gateway.reload()
    assert gw.client.get("/health").headers["x-albert-whitelist"] == "flag; entries=2"
    assert gw.client.post("/v1/chat/completions", json=CHAT).status_code == 401
    r = gw.client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {new_key}"})
    assert r.status_code == 200
    keys_file.write_text("keys: [broken")
    assert not gw.gateway.reload()  # keeps serving with the previous keys
    r = gw.client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {new_key}"})
    assert r.status_code == 200
    assert any(line.get("event") == "reload_failed" for line in gw.log_lines())
