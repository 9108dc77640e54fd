"""albert smoke: the api lane against a small fake gateway on 127.0.0.1, good and broken; the
vLLM lane against the repository's fake vLLM servers (real processes), good and broken."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from pyalbert.cli import main
from pyalbert.smoke import (
    SmokeTarget,
    VllmServer,
    VllmSmokeTarget,
    junit_xml,
    run_smoke,
    run_vllm_smoke,
)
from tests.conftest import REPO

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


# --- albert smoke vllm: the servers of the plan, directly -------------------------------------
# Each server is the repository's fake vLLM (tests/support/fake_vllm: vLLM's module path and
# arguments, /health, /v1/models, chat completions, 503 while "loading"), a real process on
# 127.0.0.1. ERROR_PATCH makes one answer completions with vLLM's 500 error body.

FAKE_VLLM = REPO / "tests" / "support" / "fake_vllm"
ERROR_PATCH = '''\
"""sitecustomize: chat completions answer HTTP 500 with vLLM's error body."""
import fake_http

_send = fake_http.Handler.send_json


def send_json(self, code, payload):
    if code == 200 and isinstance(payload, dict) and payload.get("object") == "chat.completion":
        return _send(self, 500, {"object": "error", "type": "InternalServerError", "code": 500,
                                 "message": "CUDA error: an illegal memory access was encountered"})
    return _send(self, code, payload)


fake_http.Handler.send_json = send_json
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeVllm:
    """``python -m vllm.entrypoints.openai.api_server`` (the fake) on 127.0.0.1:port."""

    def __init__(self, tmp: Path, served: str, *, env: dict[str, str] | None = None,
                 error_patch: bool = False):
        self.port, self.served = free_port(), served
        paths = [str(FAKE_VLLM)]
        if error_patch:
            patch = tmp / f"patch-{self.port}"
            patch.mkdir()
            (patch / "sitecustomize.py").write_text(ERROR_PATCH)
            paths.insert(0, str(patch))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_VLLM")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
             "--port", str(self.port), "--model", f"/models/{served}", "--served-model-name", served,
             "--tensor-parallel-size", "1"],
            env={**environ, "PYTHONPATH": os.pathsep.join(paths), **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_listening(self, timeout: float = 20.0) -> FakeVllm:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"fake vLLM on {self.port} exited"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"fake vLLM on {self.port} does not listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def vllms(tmp_path_factory) -> Iterator[dict[str, FakeVllm]]:
    """Started once for the module (in parallel): role -> server."""
    tmp = tmp_path_factory.mktemp("fake-vllm")
    servers = {
        "small": FakeVllm(tmp, "small"),
        "other": FakeVllm(tmp, "other"),
        "wrong-id": FakeVllm(tmp, "org/not-the-plan-id"),
        "error-500": FakeVllm(tmp, "small", error_patch=True),
        "never-ready": FakeVllm(tmp, "small", env={"FAKE_VLLM_FAIL": "never-ready"}),
    }
    try:
        for server in servers.values():
            server.wait_listening()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def server(port: int, model: str = "small", host: str = "gpu-1") -> VllmServer:
    return VllmServer(host=host, address="127.0.0.1", port=port, model=model)


def vllm_target(*servers: VllmServer, **kwargs) -> VllmSmokeTarget:
    return VllmSmokeTarget(**{"env": "test", "servers": servers, "timeout_s": 5.0, "wait_s": 0.5,
                              "max_tokens": 8, **kwargs})


def test_vllm_good_servers_pass_three_checks_each(vllms):
    small, other = vllms["small"].port, vllms["other"].port
    results = run_vllm_smoke(vllm_target(server(small), server(other, "other", "gpu-2")), poll_s=0.05)
    assert outcome(results) == {
        f"small on gpu-1:{small} /health": "passed",
        f"small on gpu-1:{small} /v1/models": "passed",
        f"small on gpu-1:{small} completion": "passed",
        f"other on gpu-2:{other} /health": "passed",
        f"other on gpu-2:{other} /v1/models": "passed",
        f"other on gpu-2:{other} completion": "passed",
    }
    # the fake echoes the prompt: the completion really went to that server, for that model
    assert results[2].detail.startswith("'echo: Reply with one short sentence")


def test_vllm_down_server_fails_health_naming_host_port_and_model_then_skips(vllms):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = sock.getsockname()[1]
        start = time.monotonic()
        results = run_vllm_smoke(vllm_target(server(port)), poll_s=0.05)
    assert time.monotonic() - start < 3
    health, models, completion = results
    assert (health.name, health.status) == (f"small on gpu-1:{port} /health", "failed")
    assert health.detail.startswith(f"host gpu-1 (127.0.0.1:{port}), model small: /health not ready "
                                    "after 0.5 s")
    assert "ConnectError" in health.detail
    assert [models.status, completion.status] == ["skipped", "skipped"]
    assert models.detail == f"host gpu-1 (127.0.0.1:{port}), model small: not run: /health failed"


def test_vllm_server_serving_another_model_id_fails_models_and_completion(vllms):
    port = vllms["wrong-id"].port
    results = run_vllm_smoke(vllm_target(server(port)), poll_s=0.05)
    assert outcome(results) == {f"small on gpu-1:{port} /health": "passed",
                                f"small on gpu-1:{port} /v1/models": "failed",
                                f"small on gpu-1:{port} completion": "failed"}
    got = failures(results)
    assert got[f"small on gpu-1:{port} /v1/models"] == (
        f"host gpu-1 (127.0.0.1:{port}), model small: /v1/models lists org/not-the-plan-id, not "
        "'small' (the server's --served-model-name)")
    assert "completion answered HTTP 404" in got[f"small on gpu-1:{port} completion"]
    assert "does not exist" in got[f"small on gpu-1:{port} completion"]


def test_vllm_500_on_completion_fails_that_check_only(vllms):
    port = vllms["error-500"].port
    results = run_vllm_smoke(vllm_target(server(port)), poll_s=0.05)
    assert failures(results).keys() == {f"small on gpu-1:{port} completion"}
    detail = failures(results)[f"small on gpu-1:{port} completion"]
    assert detail.startswith(f"host gpu-1 (127.0.0.1:{port}), model small: completion answered HTTP 500")
    assert "illegal memory access" in detail and "\n" not in detail


def test_vllm_503_is_waited_out_until_the_deadline(vllms):
    port = vllms["never-ready"].port
    start = time.monotonic()
    results = run_vllm_smoke(vllm_target(server(port), wait_s=0.6), poll_s=0.05)
    assert 0.5 < time.monotonic() - start < 3
    assert results[0].status == "failed" and "HTTP 503" in results[0].detail
    assert "/health not ready after 0.6 s" in results[0].detail


def test_vllm_server_still_loading_passes_once_ready(tmp_path):
    loading = FakeVllm(tmp_path, "small", env={"FAKE_VLLM_START_DELAY": "0.8"})
    try:
        loading.wait_listening()
        results = run_vllm_smoke(vllm_target(server(loading.port), wait_s=10), poll_s=0.1)
    finally:
        loading.stop()
    assert not failures(results)
    attempts = int(results[0].detail.split()[3])
    assert results[0].detail.startswith("HTTP 200 after") and attempts > 2


def test_vllm_junit_has_one_case_per_check_and_names_the_failure(vllms):
    good, down = vllms["small"].port, free_port()
    results = run_vllm_smoke(vllm_target(server(good), server(down, "other", "gpu-2")), poll_s=0.05)
    suite = ET.fromstring(junit_xml(results, "albert-smoke-vllm-test")).find("testsuite")
    assert (suite.attrib["tests"], suite.attrib["failures"], suite.attrib["skipped"]) == ("6", "1", "2")
    cases = {c.attrib["name"]: c for c in suite.iter("testcase")}
    failure = cases[f"other on gpu-2:{down} /health"].find("failure").attrib["message"]
    assert failure.startswith(f"host gpu-2 (127.0.0.1:{down}), model other: /health not ready")
    assert cases[f"small on gpu-1:{good} completion"].find("failure") is None


PLAN_ENV = """
    [[hosts]]
    name = "gpu-1"
    address = "127.0.0.1"
    gpus = 1
"""


@pytest.fixture(autouse=True)
def hosts_are_this_machine(monkeypatch, tmp_path):
    """``albert smoke vllm`` runs its calls on the servers' hosts: here, a local runner; the
    deploy's curl header file is where the CLI's plan says (``deploy.base_dir``)."""
    from pyalbert.engine import fanout
    from pyalbert.remote import LocalRunner

    monkeypatch.setattr(fanout, "ssh_runners", lambda spec, material=None: lambda host: LocalRunner())
    base = tmp_path / "base"
    (base / "auth-test").mkdir(parents=True)
    (base / "auth-test" / "vllm.header").write_text("Authorization: Bearer any\n")
    monkeypatch.setattr(sys.modules[__name__], "PLAN_ENV",
                        PLAN_ENV + f'\n[deploy]\nbase_dir = "{base}"\n')
    return base


@pytest.fixture
def vllm_config(config_factory, vllms):
    """A plan whose two vLLM servers are two running fakes: ``small`` and ``other``."""
    config_factory.env(PLAN_ENV)
    config_factory.routing({m: {"model": f"org/{m}", "port": vllms[m].port, "gpu_mem_use": 0.4}
                            for m in ("small", "other")})
    return config_factory


def test_cli_vllm_checks_every_server_of_the_plan_and_writes_junit(vllm_config, vllms, monkeypatch,
                                                                     capsys, tmp_path):
    monkeypatch.delenv("ALBERT_API_KEY", raising=False)  # the servers need no client key
    report = tmp_path / "smoke-vllm.xml"
    code = main(["smoke", "vllm", "--env", "test", "--config-dir", str(vllm_config.root),
                 "--junit", str(report), "--wait", "2", "--timeout", "5"])
    out = capsys.readouterr()
    assert code == 0, out
    assert "6 check(s) passed or skipped" in out.out
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.attrib["name"] == "albert-smoke-vllm-test" and suite.attrib["failures"] == "0"
    assert sorted(c.attrib["name"] for c in suite.iter("testcase")) == sorted(
        f"{m} on gpu-1:{vllms[m].port} {check}" for m in ("small", "other")
        for check in ("/health", "/v1/models", "completion"))


def test_cli_vllm_fails_with_a_line_naming_the_server(config_factory, vllms, capsys):
    config_factory.env(PLAN_ENV)
    port = vllms["wrong-id"].port
    config_factory.routing({"small": {"model": "org/small", "port": port, "gpu_mem_use": 0.4}})
    code = main(["smoke", "vllm", "--env", "test", "--config-dir", str(config_factory.root),
                 "--wait", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert (f"FAILED small on gpu-1:{port} /v1/models: host gpu-1 (127.0.0.1:{port}), model small: "
            "/v1/models lists org/not-the-plan-id") in " ".join(err.split())
    assert "2 of 3 check(s) failed" in err


def test_cli_vllm_refuses_the_api_url(vllm_config, capsys):
    code = main(["smoke", "vllm", "--env", "test", "--config-dir", str(vllm_config.root),
                 "--url", "http://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 1 and "drop --url" in err and "Traceback" not in err


def test_cli_service_defaults_to_api_and_only_knows_the_two_lanes(smoke_config, monkeypatch, capsys):
    config, _ = smoke_config
    monkeypatch.setenv("ALBERT_API_KEY", KEY)
    assert main(["smoke", "api", "--env", "test", "--config-dir", str(config.root), "--wait", "2"]) == 0
    assert "8 check(s) passed or skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["smoke", "gpu", "--env", "test"])
    assert exc.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err
