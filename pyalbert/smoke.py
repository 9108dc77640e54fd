"""``albert smoke``: the checks of a deployed environment, one per lane of the pipeline.

``albert smoke api`` (or ``albert smoke``; the ``test:api`` job) goes through the api gateway.
Checks, each a JUnit test case:

* ``api ready``: ``GET /v1/models`` answers (waits, up to a deadline, while the api refuses
  connections, answers 503 or does not list every routed model yet);
* ``models listed``: every model of the routing table is in ``GET /v1/models``;
* ``chat <model>`` and ``stream <model>``: a small completion, plain and streamed (SSE), returns
  non-empty text within the per-request timeout;
* ``bad key refused``: a wrong API key gets 401;
* ``whitelist header``: answers carry ``X-Albert-Whitelist: <mode>; entries=<n>`` with the
  environment's mode (skipped, and said so, when the mode is ``off``).

``albert smoke vllm`` (the ``test:vllm`` job) asks every vLLM server of the plan, no gateway in
between, *on its host*: servers listen on the host's loopback or private address only and require
the servers' key (issue 14), so each call is a ``curl`` run over SSH (:class:`HostTransport`,
:func:`pyalbert.commands.health.http_call`) with the key's header file the deploy left on the host.
Per server, each check a JUnit test case named ``<model> on <host>:<port> …``:

* ``/health``: answers 200 (waits, up to a deadline shared by all servers, while the server refuses
  connections or answers 503);
* ``/v1/models``: lists the served model id (the routing-table key, vLLM's ``--served-model-name``);
* ``completion``: one short chat completion of that model returns non-empty text.

When ``/health`` fails, the server's other two checks are skipped (the one failure says why).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import httpx
from rich.table import Table

from pyalbert.commands import health
from pyalbert.commands.base import Cmd

WHITELIST_HEADER = "X-Albert-Whitelist"
BAD_KEY = "albert-smoke-invalid-key"
PROMPT = "Reply with one short sentence: what is the capital of France?"


@dataclass
class CheckResult:
    name: str
    status: str  # passed, failed, skipped
    seconds: float
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(frozen=True)
class SmokeTarget:
    """What to check: the api's URL and key, the routed models, the expected whitelist mode."""

    env: str
    url: str
    api_key: str = field(repr=False)
    models: tuple[str, ...]
    whitelist_mode: str = "flag"
    timeout_s: float = 60.0
    wait_s: float = 120.0
    max_tokens: int = 16


class _Failed(Exception):
    """A check's one-line reason."""


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_text(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


#: errors that mean "not up (yet)": waited out until the deadline
_NOT_UP = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


def _client(timeout_s: float, **kwargs) -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), **kwargs)


class _Checks:
    """Timed checks appended to ``results``: a check returns its detail or raises ``_Failed``."""

    detail_limit = 160

    def __init__(self, poll_s: float, sleep: Callable[[float], None]):
        self.poll_s = poll_s
        self.sleep = sleep
        self.results: list[CheckResult] = []

    def _check(self, name: str, func: Callable[[], str], prefix: str = "") -> CheckResult:
        start = time.perf_counter()
        try:
            detail, status = func(), "passed"
        except _Failed as exc:
            detail, status = prefix + str(exc), "failed"
        except httpx.HTTPError as exc:
            detail, status = prefix + _error_text(exc), "failed"
        result = CheckResult(name, status, time.perf_counter() - start, _short(detail, self.detail_limit))
        self.results.append(result)
        return result

    def _skip(self, name: str, reason: str) -> None:
        self.results.append(CheckResult(name, "skipped", 0.0, reason))


class SmokeRun(_Checks):
    """Runs the checks in order against one target; ``results`` is filled as it goes."""

    def __init__(self, target: SmokeTarget, client: httpx.Client | None = None, *,
                 poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        super().__init__(poll_s, sleep)
        self.target = target
        self.client = client or _client(target.timeout_s, base_url=target.url)
        self.whitelist_headers: list[str | None] = []
        self._deadline = 0.0

    # -- helpers -------------------------------------------------------------------------------
    def _auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key if key is not None else self.target.api_key}"}

    def _post_until_ready(self, payload: dict) -> httpx.Response:
        """POST a chat; a 503 (model still loading behind the gateway) is retried until the deadline."""
        while True:
            response = self.client.post("/v1/chat/completions", json=payload, headers=self._auth())
            if response.status_code != 503 or time.monotonic() + self.poll_s > self._deadline:
                return response
            self.sleep(self.poll_s)

    @staticmethod
    def _expect_ok(response: httpx.Response) -> None:
        if response.status_code != 200:
            raise _Failed(f"HTTP {response.status_code}: {_short(response.text, 120)}")

    # -- checks --------------------------------------------------------------------------------
    def check_ready(self) -> str:
        """Wait for an answer other than 503 / refused, and for every model to be listed; at the
        deadline an api that answers is ready (``models listed`` then names what is missing)."""
        wanted = set(self.target.models)
        attempts, last, answered = 0, "", False
        while True:
            attempts += 1
            try:
                response = self.client.get("/v1/models", headers=self._auth())
                listed = _model_ids(response) if response.status_code == 200 else set()
                if response.status_code not in (200, 503) or wanted <= listed:
                    return f"HTTP {response.status_code} after {attempts} attempt(s)"
                answered = response.status_code == 200
                last = (f"HTTP 503: {_short(response.text, 80)}" if response.status_code == 503
                        else f"models not listed yet: {', '.join(sorted(wanted - listed))}")
            except _NOT_UP as exc:
                answered, last = False, _error_text(exc)
            if time.monotonic() + self.poll_s > self._deadline:
                if answered:
                    return f"HTTP 200 after {attempts} attempt(s), {last}"
                raise _Failed(f"{self.target.url} not ready after {self.target.wait_s:g} s "
                              f"({attempts} attempts); last: {last}")
            self.sleep(self.poll_s)

    def check_models(self) -> str:
        response = self.client.get("/v1/models", headers=self._auth())
        self._expect_ok(response)
        listed = _model_ids(response)
        missing = [m for m in self.target.models if m not in listed]
        if missing:
            raise _Failed(f"not listed: {', '.join(missing)} (listed: {', '.join(sorted(listed)) or 'none'})")
        return f"{len(self.target.models)} model(s) listed"

    def _payload(self, model: str, stream: bool) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": self.target.max_tokens, "temperature": 0, "stream": stream}

    def check_chat(self, model: str) -> str:
        response = self._post_until_ready(self._payload(model, stream=False))
        self._expect_ok(response)
        self.whitelist_headers.append(response.headers.get(WHITELIST_HEADER))
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Failed(f"not an OpenAI chat completion: {_short(response.text, 120)}") from None
        if not text.strip():
            raise _Failed("empty answer")
        return repr(_short(text, 60))

    def check_stream(self, model: str) -> str:
        payload = self._payload(model, stream=True)
        with self.client.stream("POST", "/v1/chat/completions", json=payload,
                                headers=self._auth()) as response:
            if response.status_code != 200:
                response.read()
                self._expect_ok(response)
            self.whitelist_headers.append(response.headers.get(WHITELIST_HEADER))
            text, chunks, done = [], 0, False
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise _Failed(f"malformed SSE event: {_short(data, 80)}") from None
                if "error" in event:
                    raise _Failed(f"error event: {_short(json.dumps(event['error']), 120)}")
                chunks += 1
                for choice in event.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
        answer = "".join(text)
        if not done:
            raise _Failed(f"stream ended without 'data: [DONE]' after {chunks} chunk(s)")
        if not answer.strip():
            raise _Failed(f"empty streamed answer ({chunks} chunk(s))")
        return f"{chunks} chunk(s): {_short(answer, 50)!r}"

    def check_bad_key(self) -> str:
        payload = self._payload(self.target.models[0], stream=False)
        response = self.client.post("/v1/chat/completions", json=payload, headers=self._auth(BAD_KEY))
        if response.status_code != 401:
            raise _Failed(f"a wrong API key got HTTP {response.status_code}, expected 401")
        return "401"

    def check_whitelist_header(self) -> str:
        mode = self.target.whitelist_mode
        seen = list(self.whitelist_headers)
        if not seen:
            raise _Failed("no chat answer to read the header from (see the chat checks)")
        if any(h is None for h in seen):
            raise _Failed(f"{seen.count(None)} of {len(seen)} answer(s) lack {WHITELIST_HEADER}: "
                          "is whitelist post-processing active?")
        wrong = sorted({h for h in seen if h is not None and not _header_ok(h, mode)})
        if wrong:
            raise _Failed(f"{WHITELIST_HEADER} is {wrong[0]!r}, expected '{mode}; entries=<n>'")
        return f"{seen[0]}"

    # -- all -----------------------------------------------------------------------------------
    def run(self) -> list[CheckResult]:
        self._deadline = time.monotonic() + self.target.wait_s
        ready = self._check("api ready", self.check_ready)
        names = ["models listed"]
        for model in self.target.models:
            names += [f"chat {model}", f"stream {model}"]
        names += ["bad key refused", "whitelist header"]
        if ready.failed:
            for name in names:
                self.results.append(CheckResult(name, "failed", 0.0, "not run: the api is not ready"))
            return self.results
        self._check("models listed", self.check_models)
        for model in self.target.models:
            self._check(f"chat {model}", lambda m=model: self.check_chat(m))
            self._check(f"stream {model}", lambda m=model: self.check_stream(m))
        self._check("bad key refused", self.check_bad_key)
        if self.target.whitelist_mode == "off":
            self._skip("whitelist header", "whitelist_mode is 'off' in the environment: check skipped")
        else:
            self._check("whitelist header", self.check_whitelist_header)
        return self.results


def _model_ids(response: httpx.Response) -> set[str]:
    try:
        return {m["id"] for m in response.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return set()


def _header_ok(value: str, mode: str) -> bool:
    head, _, rest = value.partition(";")
    entries = rest.strip()
    return head.strip() == mode and entries.startswith("entries=") and entries[8:].isdigit()


def run_smoke(target: SmokeTarget, client: httpx.Client | None = None, **kwargs) -> list[CheckResult]:
    run = SmokeRun(target, client, **kwargs)
    try:
        return run.run()
    finally:
        if client is None:
            run.client.close()


# --- the vLLM servers, directly ----------------------------------------------------------------


@dataclass(frozen=True)
class VllmServer:
    """One vLLM OpenAI server of the plan: where it listens and the model id it serves."""

    host: str  # the host's name in the environment
    address: str  # where it listens (loopback or the host's private address)
    port: int
    model: str
    #: on the host: the curl header file with the servers' key (None: no key)
    header_file: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def label(self) -> str:
        """The test cases' name prefix: model, host and port."""
        return f"{self.model} on {self.host}:{self.port}"

    @property
    def where(self) -> str:
        """How a failure names the server: host, address and port, model."""
        return f"host {self.host} ({self.address}:{self.port}), model {self.model}: "


@dataclass(frozen=True)
class VllmSmokeTarget:
    env: str
    servers: tuple[VllmServer, ...]
    timeout_s: float = 60.0
    wait_s: float = 120.0
    max_tokens: int = 16


def vllm_servers(plan, header_file: str | None = None) -> tuple[VllmServer, ...]:
    """Every vLLM server of a resolved plan (``load_spec(...).placement``), in plan order."""
    return tuple(VllmServer(host=i.host.name, address=i.address, port=i.port, model=i.model_id,
                            header_file=header_file)
                 for i in plan.vllm)


class HostTransport(httpx.BaseTransport):
    """An httpx transport that makes each call *on the server's host*: ``curl`` over the one
    executor (``run(host name, Cmd) -> Result``), the key from the host's header file.

    No answer (curl's ``000``: refused, timed out) is an ``httpx.ConnectError`` with curl's
    message, so the checks wait it out as they do for a direct connection.
    """

    def __init__(self, servers: tuple[VllmServer, ...], run: Callable[[str, Cmd], object],
                 timeout_s: float = 60.0):
        self.by_url = {s.url: s for s in servers}
        self.run = run
        self.timeout_s = timeout_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        server = self.by_url.get(base)
        if server is None:
            raise httpx.ConnectError(f"{base} is no server of the plan", request=request)
        body = request.read().decode() if request.method != "GET" else None
        cmd = health.http_call(request.method, str(request.url), body=body,
                               header_file=server.header_file, timeout_s=self.timeout_s)
        result = self.run(server.host, cmd)
        status, text = health.parse_http_call(result.stdout)
        if status == 0:
            why = (result.stderr or "").strip().splitlines()
            raise httpx.ConnectError(f"on host {server.host}: {why[-1] if why else 'no answer'}",
                                     request=request)
        return httpx.Response(status, content=text.encode(), request=request)


class VllmSmokeRun(_Checks):
    """``/health``, ``/v1/models`` and one completion per server, in plan order."""

    detail_limit = 240

    def __init__(self, target: VllmSmokeTarget, client: httpx.Client | None = None, *,
                 poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        super().__init__(poll_s, sleep)
        self.target = target
        self.client = client or _client(target.timeout_s)
        self._deadline = 0.0

    def check_health(self, server: VllmServer) -> str:
        """200 on ``/health``; refused connections and 503 (weights loading) are waited out."""
        attempts, last = 0, ""
        while True:
            attempts += 1
            try:
                response = self.client.get(f"{server.url}/health")
                if response.status_code == 200:
                    return f"HTTP 200 after {attempts} attempt(s)"
                last = f"HTTP {response.status_code}: {_short(response.text, 80)}"
                if response.status_code != 503:
                    raise _Failed(f"/health answered {last}")
            except _NOT_UP as exc:
                last = _error_text(exc)
            if time.monotonic() + self.poll_s > self._deadline:
                raise _Failed(f"/health not ready after {self.target.wait_s:g} s ({attempts} "
                              f"attempt(s)); last: {last}")
            self.sleep(self.poll_s)

    def check_models(self, server: VllmServer) -> str:
        response = self.client.get(f"{server.url}/v1/models")
        if response.status_code != 200:
            raise _Failed(f"/v1/models answered HTTP {response.status_code}: {_short(response.text, 80)}")
        listed = _model_ids(response)
        if server.model not in listed:
            raise _Failed(f"/v1/models lists {', '.join(sorted(listed)) or 'no model'}, not "
                          f"{server.model!r} (the server's --served-model-name)")
        return f"{server.model} listed"

    def check_completion(self, server: VllmServer) -> str:
        payload = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}],
                   "max_tokens": self.target.max_tokens, "temperature": 0}
        response = self.client.post(f"{server.url}/v1/chat/completions", json=payload)
        if response.status_code != 200:
            raise _Failed(f"completion answered HTTP {response.status_code}: {_short(response.text, 120)}")
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Failed(f"completion is not an OpenAI chat completion: {_short(response.text, 120)}") from None
        if not text.strip():
            raise _Failed("completion answered an empty text")
        return repr(_short(text, 60))

    def run(self) -> list[CheckResult]:
        self._deadline = time.monotonic() + self.target.wait_s
        for server in self.target.servers:
            health = self._check(f"{server.label} /health", lambda s=server: self.check_health(s),
                                 server.where)
            rest = [("/v1/models", self.check_models), ("completion", self.check_completion)]
            for check, func in rest:
                name = f"{server.label} {check}"
                if health.failed:
                    self._skip(name, f"{server.where}not run: /health failed")
                else:
                    self._check(name, lambda f=func, s=server: f(s), server.where)
        return self.results


def run_vllm_smoke(target: VllmSmokeTarget, client: httpx.Client | None = None,
                   **kwargs) -> list[CheckResult]:
    run = VllmSmokeRun(target, client, **kwargs)
    try:
        return run.run()
    finally:
        if client is None:
            run.client.close()


# --- reports -----------------------------------------------------------------------------------


def junit_xml(results: list[CheckResult], suite: str) -> bytes:
    root = ET.Element("testsuites")
    node = ET.SubElement(root, "testsuite", {
        "name": suite,
        "tests": str(len(results)),
        "failures": str(sum(r.failed for r in results)),
        "errors": "0",
        "skipped": str(sum(r.status == "skipped" for r in results)),
        "time": f"{sum(r.seconds for r in results):.3f}",
    })
    for result in results:
        case = ET.SubElement(node, "testcase", {"classname": suite, "name": result.name,
                                                "time": f"{result.seconds:.3f}"})
        if result.failed:
            ET.SubElement(case, "failure", {"message": result.detail}).text = result.detail
        elif result.status == "skipped":
            ET.SubElement(case, "skipped", {"message": result.detail})
        elif result.detail:
            ET.SubElement(case, "system-out").text = result.detail
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: Path, results: list[CheckResult], suite: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(junit_xml(results, suite))


def summary_table(results: list[CheckResult], title: str) -> Table:
    table = Table(title=title)
    for column in ("check", "result", "time", "detail"):
        table.add_column(column, overflow="fold")
    style = {"passed": "[green]passed[/]", "failed": "[bold red]FAILED[/]", "skipped": "[yellow]skipped[/]"}
    for r in results:
        table.add_row(r.name, style[r.status], f"{r.seconds:.2f} s", r.detail)
    return table
