"""albert smoke against a small fake gateway on 127.0.0.1, good and broken."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.etree import ElementTree as ET

import pytest

from pyalbert.cli import main
from pyalbert.smoke import SmokeTarget, junit_xml, run_smoke

KEY = "sk-good-key"
MODELS = ("small", "other")


@dataclass
class Behaviour:
    """How the fake gateway answers; each field breaks one thing."""

    listed: tuple[str, ...] = MODELS
    content: str = "Paris is the capital of France."
    stream_done: bool = True
    auth: bool = True
    header: str | None = "flag; entries=12"
    delay_s: float = 0.0
    unavailable_first: int = 0  # answer 503 to this many requests first
    requests: list[str] = field(default_factory=list)


class FakeGateway(BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        if self.behaviour.header is not None:
            self.send_header("X-Albert-Whitelist", self.behaviour.header)
        self.end_headers()
        self.wfile.write(body)

    def _gate(self) -> bool:
        b = self.behaviour
        b.requests.append(f"{self.command} {self.path}")
        if b.unavailable_first > 0:
            b.unavailable_first -= 1
            self._send(503, b'{"error": {"message": "starting"}}')
            return False
        if b.auth and self.headers.get("Authorization") != f"Bearer {KEY}":
            self._send(401, b'{"error": {"message": "invalid key", "code": "invalid_api_key"}}')
            return False
        return True

    def do_GET(self) -> None:
        if not self._gate():
            return
        if self.path == "/v1/models":
            data = [{"id": m, "object": "model"} for m in self.behaviour.listed]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if not self._gate():
            return
        b = self.behaviour
        time.sleep(b.delay_s)
        assert body["max_tokens"] <= 32 and body["messages"][0]["role"] == "user"
        if not body.get("stream"):
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": b.content}}]}
            self._send(200, json.dumps(answer).encode())
            return
        events = [{"choices": [{"index": 0, "delta": {"content": word}}]}
                  for word in b.content.split(" ") if b.content]
        lines = [f"data: {json.dumps(e)}\n\n" for e in events]
        if b.stream_done:
            lines.append("data: [DONE]\n\n")
        self._send(200, "".join(lines).encode(), "text/event-stream")


@pytest.fixture
def gateway() -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    handler = type("Handler", (FakeGateway,), {"behaviour": behaviour})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", behaviour
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def target(url: str, **kwargs) -> SmokeTarget:
    defaults = {"env": "test", "url": url, "api_key": KEY, "models": MODELS, "whitelist_mode": "flag",
                "timeout_s": 2.0, "wait_s": 0.4, "max_tokens": 8}
    return SmokeTarget(**{**defaults, **kwargs})


def outcome(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def failures(results) -> dict[str, str]:
    return {r.name: r.detail for r in results if r.failed}


def test_good_gateway_passes_every_check(gateway):
    url, _ = gateway
    results = run_smoke(target(url), poll_s=0.05)
    assert outcome(results) == {
        "api ready": "passed", "models listed": "passed",
        "chat small": "passed", "stream small": "passed",
        "chat other": "passed", "stream other": "passed",
        "bad key refused": "passed", "whitelist header": "passed",
    }
    details = {r.name: r.detail for r in results}
    assert "Paris" in details["chat small"] and details["stream small"].startswith("6 chunk(s)")
    assert details["whitelist header"] == "flag; entries=12"


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"listed": ("small",)}, {"models listed": "not listed: other"}),
        ({"content": ""}, {"chat small": "empty answer", "stream small": "empty streamed answer",
                           "chat other": "empty answer", "stream other": "empty streamed answer"}),
        ({"stream_done": False}, {"stream small": "without 'data: [DONE]' after 6 chunk(s)",
                                  "stream other": "without 'data: [DONE]'"}),
        ({"auth": False}, {"bad key refused": "a wrong API key got HTTP 200, expected 401"}),
        ({"header": None}, {"whitelist header": "4 of 4 answer(s) lack X-Albert-Whitelist"}),
        ({"header": "off; entries=0"}, {"whitelist header": "expected 'flag; entries=<n>'"}),
        ({"delay_s": 0.6, "timeout_s": 0.2}, {"chat small": "timed out", "stream small": "timed out",
                            "chat other": "timed out", "stream other": "timed out",
                            "whitelist header": "no chat answer"}),
    ],
    ids=["model-missing", "empty-answer", "stream-no-done", "bad-key-accepted", "no-header",
         "wrong-mode", "too-slow"],
)
def test_broken_gateway_fails_with_one_line_reasons(gateway, change, failed):
    url, behaviour = gateway
    options = {k: change.pop(k) for k in list(change) if k in SmokeTarget.__dataclass_fields__}
    for key, value in change.items():
        setattr(behaviour, key, value)
    results = run_smoke(target(url, **options), poll_s=0.05)
    got = failures(results)
    assert set(got) == set(failed)
    for name, reason in failed.items():
        assert reason in got[name]
        assert "\n" not in got[name]


def test_waits_while_the_api_answers_503(gateway):
    url, behaviour = gateway
    behaviour.unavailable_first = 3
    results = run_smoke(target(url, wait_s=5.0), poll_s=0.05)
    assert not failures(results)
    assert results[0].detail == "HTTP 200 after 4 attempt(s)"


def test_waits_until_every_model_is_listed_then_reports_missing(gateway):
    url, behaviour = gateway
    behaviour.listed = ("small",)
    start = time.monotonic()
    results = run_smoke(target(url, wait_s=0.5), poll_s=0.05)
    assert 0.4 < time.monotonic() - start < 5
    assert results[0].status == "passed" and "models not listed yet: other" in results[0].detail
    assert len([r for r in behaviour.requests if r == "GET /v1/models"]) > 3


def test_refused_connections_fail_after_the_deadline():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        start = time.monotonic()
        results = run_smoke(target(url, wait_s=0.5), poll_s=0.05)
    assert time.monotonic() - start < 3
    assert results[0].status == "failed" and "not ready after 0.5 s" in results[0].detail
    assert "ConnectError" in results[0].detail
    assert all(r.status == "failed" and r.detail == "not run: the api is not ready" for r in results[1:])
    assert len(results) == 8


def test_mode_off_skips_the_header_check_and_says_so(gateway):
    url, behaviour = gateway
    behaviour.header = None
    results = run_smoke(target(url, whitelist_mode="off"), poll_s=0.05)
    last = results[-1]
    assert (last.name, last.status) == ("whitelist header", "skipped")
    assert "'off'" in last.detail and not failures(results)


def test_junit_xml_has_one_case_per_check(gateway):
    url, behaviour = gateway
    behaviour.auth = False
    results = run_smoke(target(url, whitelist_mode="off"), poll_s=0.05)
    suite = ET.fromstring(junit_xml(results, "albert-smoke-test")).find("testsuite")
    assert suite.attrib["tests"] == "8" and suite.attrib["failures"] == "1"
    assert suite.attrib["skipped"] == "1"
    cases = {c.attrib["name"]: c for c in suite.iter("testcase")}
    assert len(cases) == 8
    assert "expected 401" in cases["bad key refused"].find("failure").attrib["message"]
    assert cases["whitelist header"].find("skipped") is not None
    assert cases["chat small"].find("failure") is None


ENV = """
    url = "{url}"

    [[hosts]]
    name = "gpu-1"
    address = "10.0.0.1"
    gpus = 1

    [api]
    whitelist_mode = "redact"
"""


@pytest.fixture
def smoke_config(config_factory, gateway):
    url, behaviour = gateway
    behaviour.header = "redact; entries=3"
    config_factory.env(ENV.format(url=url))
    config_factory.routing({m: {"model": f"org/{m}", "port": 8001 + i, "gpu_mem_use": 0.4}
                            for i, m in enumerate(MODELS)})
    return config_factory, behaviour


def test_cli_passes_writes_junit_and_never_prints_the_key(smoke_config, monkeypatch, capsys, tmp_path):
    config, _ = smoke_config
    monkeypatch.setenv("ALBERT_API_KEY", KEY)
    report = tmp_path / "reports" / "smoke.xml"
    code = main(["smoke", "--env", "test", "--config-dir", str(config.root), "--junit", str(report),
                 "--timeout", "5", "--wait", "2"])
    out = capsys.readouterr()
    assert code == 0, out
    assert "8 check(s) passed or skipped" in out.out and KEY not in out.out + out.err
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.attrib["failures"] == "0" and suite.attrib["tests"] == "8"


def test_cli_fails_with_a_line_per_failed_check(smoke_config, monkeypatch, capsys):
    config, behaviour = smoke_config
    behaviour.auth = False
    behaviour.header = "flag; entries=3"
    monkeypatch.setenv("ALBERT_API_KEY", KEY)
    code = main(["smoke", "--env", "test", "--config-dir", str(config.root), "--wait", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED bad key refused: a wrong API key got HTTP 200, expected 401" in err
    assert "FAILED whitelist header: X-Albert-Whitelist is 'flag; entries=3', expected 'redact" in err
    assert "2 of 8 check(s) failed" in err


def test_cli_without_a_key_explains_which_variable(smoke_config, monkeypatch, capsys):
    config, behaviour = smoke_config
    monkeypatch.delenv("ALBERT_API_KEY", raising=False)
    assert main(["smoke", "--env", "test", "--config-dir", str(config.root)]) == 1
    err = capsys.readouterr().err
    assert "ALBERT_API_KEY is not set" in err and "Traceback" not in err
    assert behaviour.requests == []
