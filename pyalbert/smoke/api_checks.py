"""``albert smoke api``: the checks through the api gateway (see the package docstring)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

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

WHITELIST_HEADER = "X-Albert-Whitelist"
BAD_KEY = "albert-smoke-invalid-key"


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


class SmokeRun(Checks):
    """Runs the checks in order against one target; ``results`` is filled as it goes."""

    def __init__(self, target: SmokeTarget, client: httpx.Client | None = None, *,
                 poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        super().__init__(poll_s, sleep)
        self.target = target
        self.client = client or http_client(target.timeout_s, base_url=target.url)
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
            raise CheckFailed(f"HTTP {response.status_code}: {shorten(response.text, 120)}")

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
                listed = model_ids(response) if response.status_code == 200 else set()
                if response.status_code not in (200, 503) or wanted <= listed:
                    return f"HTTP {response.status_code} after {attempts} attempt(s)"
                answered = response.status_code == 200
                last = (f"HTTP 503: {shorten(response.text, 80)}" if response.status_code == 503
                        else f"models not listed yet: {', '.join(sorted(wanted - listed))}")
            except NOT_UP as exc:
                answered, last = False, error_text(exc)
            if time.monotonic() + self.poll_s > self._deadline:
                if answered:
                    return f"HTTP 200 after {attempts} attempt(s), {last}"
                raise CheckFailed(f"{self.target.url} not ready after {self.target.wait_s:g} s "
                              f"({attempts} attempts); last: {last}")
            self.sleep(self.poll_s)

    def check_models(self) -> str:
        response = self.client.get("/v1/models", headers=self._auth())
        self._expect_ok(response)
        listed = model_ids(response)
        missing = [m for m in self.target.models if m not in listed]
        if missing:
            raise CheckFailed(f"not listed: {', '.join(missing)} (listed: {', '.join(sorted(listed)) or 'none'})")
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
            raise CheckFailed(f"not an OpenAI chat completion: {shorten(response.text, 120)}") from None
        if not text.strip():
            raise CheckFailed("empty answer")
        return repr(shorten(text, 60))

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
                    raise CheckFailed(f"malformed SSE event: {shorten(data, 80)}") from None
                if "error" in event:
                    raise CheckFailed(f"error event: {shorten(json.dumps(event['error']), 120)}")
                chunks += 1
                for choice in event.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
        answer = "".join(text)
        if not done:
            raise CheckFailed(f"stream ended without 'data: [DONE]' after {chunks} chunk(s)")
        if not answer.strip():
            raise CheckFailed(f"empty streamed answer ({chunks} chunk(s))")
        return f"{chunks} chunk(s): {shorten(answer, 50)!r}"

    def check_bad_key(self) -> str:
        payload = self._payload(self.target.models[0], stream=False)
        response = self.client.post("/v1/chat/completions", json=payload, headers=self._auth(BAD_KEY))
        if response.status_code != 401:
            raise CheckFailed(f"a wrong API key got HTTP {response.status_code}, expected 401")
        return "401"

    def check_whitelist_header(self) -> str:
        mode = self.target.whitelist_mode
        seen = list(self.whitelist_headers)
        if not seen:
            raise CheckFailed("no chat answer to read the header from (see the chat checks)")
        if any(h is None for h in seen):
            raise CheckFailed(f"{seen.count(None)} of {len(seen)} answer(s) lack {WHITELIST_HEADER}: "
                          "is whitelist post-processing active?")
        wrong = sorted({h for h in seen if h is not None and not _header_ok(h, mode)})
        if wrong:
            raise CheckFailed(f"{WHITELIST_HEADER} is {wrong[0]!r}, expected '{mode}; entries=<n>'")
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
