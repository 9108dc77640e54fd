"""``albert smoke vllm``: each vLLM server asked on its host, over SSH (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from pyalbert.commands import health
from pyalbert.commands.base import Cmd
from pyalbert.smoke.checks import (
    NOT_UP,
    PROMPT,
    CheckFailed,
    CheckResult,
    Checks,
    error_text,
    http_client,
    model_ids,
    shorten,
)


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


class VllmSmokeRun(Checks):
    """``/health``, ``/v1/models`` and one completion per server, in plan order."""

    detail_limit = 240

    def __init__(self, target: VllmSmokeTarget, client: httpx.Client | None = None, *,
                 poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        super().__init__(poll_s, sleep)
        self.target = target
        self.client = client or http_client(target.timeout_s)
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
                last = f"HTTP {response.status_code}: {shorten(response.text, 80)}"
                if response.status_code != 503:
                    raise CheckFailed(f"/health answered {last}")
            except NOT_UP as exc:
                last = error_text(exc)
            if time.monotonic() + self.poll_s > self._deadline:
                raise CheckFailed(f"/health not ready after {self.target.wait_s:g} s ({attempts} "
                              f"attempt(s)); last: {last}")
            self.sleep(self.poll_s)

    def check_models(self, server: VllmServer) -> str:
        response = self.client.get(f"{server.url}/v1/models")
        if response.status_code != 200:
            raise CheckFailed(f"/v1/models answered HTTP {response.status_code}: {shorten(response.text, 80)}")
        listed = model_ids(response)
        if server.model not in listed:
            raise CheckFailed(f"/v1/models lists {', '.join(sorted(listed)) or 'no model'}, not "
                          f"{server.model!r} (the server's --served-model-name)")
        return f"{server.model} listed"

    def check_completion(self, server: VllmServer) -> str:
        payload = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}],
                   "max_tokens": self.target.max_tokens, "temperature": 0}
        response = self.client.post(f"{server.url}/v1/chat/completions", json=payload)
        if response.status_code != 200:
            raise CheckFailed(f"completion answered HTTP {response.status_code}: {shorten(response.text, 120)}")
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise CheckFailed(f"completion is not an OpenAI chat completion: {shorten(response.text, 120)}") from None
        if not text.strip():
            raise CheckFailed("completion answered an empty text")
        return repr(shorten(text, 60))

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
