"""A client for an OpenAI-compatible server behind a managed platform (httpx).

Adds the platform's headers (``Authorization: Bearer <IAM token>``, ``x-folder-id``,
``x-node-id``), waits through ``503`` (and 502/504, refused connections) while a node loads its
model, with bounded exponential backoff, ``Retry-After`` honoured, and an overall deadline, and
turns 401/403/404 into one-paragraph :class:`ClientError` messages naming the fix.

    client = PlatformClient.from_env("https://node.example.org", folder_id="b1g...")
    print(client.chat_text("albert-light", "Bonjour"))

Tests pass ``transport=`` (``httpx.MockTransport``) or a local server; ``sleep``/``clock`` are
injectable so waiting is observable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from pyalbert.errors import AlbertError

#: environment variables the credentials come from (never command-line flags: ``ps`` shows argv)
TOKEN_ENV = "IAM_TOKEN"
FOLDER_ENV = "FOLDER_ID"
NODE_ENV = "NODE_ID"
RETRY_STATUSES = frozenset({502, 503, 504})


class ClientError(AlbertError):
    """The server refused or failed a request; the message says why and what to change."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def platform_headers(iam_token: SecretStr | str | None = None, folder_id: str | None = None,
                     node_id: str | None = None) -> dict[str, str]:
    """The headers a managed node's gateway wants (only those with a value)."""
    headers = {}
    if iam_token:
        value = iam_token.get_secret_value() if isinstance(iam_token, SecretStr) else iam_token
        headers["Authorization"] = f"Bearer {value}"
    if folder_id:
        headers["x-folder-id"] = folder_id
    if node_id:
        headers["x-node-id"] = node_id
    return headers


@dataclass(frozen=True)
class Backoff:
    """Waits between retries: ``initial`` x ``factor``^n, at most ``maximum``, within ``deadline``."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 15.0
    deadline: float = 600.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield min(delay, self.maximum)
            delay *= self.factor


#: ``on_wait(reason, delay_s, remaining_s)``: called before each wait
OnWait = Callable[[str, float, float], None]


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:300]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:300]
    return str(err)[:300]


class PlatformClient:
    def __init__(
        self,
        base_url: str,
        *,
        iam_token: SecretStr | str | None = None,
        folder_id: str | None = None,
        node_id: str | None = None,
        backoff: Backoff = Backoff(),
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        on_wait: OnWait | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.base_url = _base(base_url)
        self.has_token = bool(iam_token)
        self.folder_id, self.node_id = folder_id, node_id
        self.backoff, self.on_wait = backoff, on_wait
        self._sleep, self._clock = sleep, clock
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=platform_headers(iam_token, folder_id, node_id),
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    @classmethod
    def from_env(cls, base_url: str, *, environ: Mapping[str, str] | None = None,
                 folder_id: str | None = None, node_id: str | None = None, **kwargs) -> PlatformClient:
        """Token from ``$IAM_TOKEN``; folder and node from the arguments, else ``$FOLDER_ID``/``$NODE_ID``."""
        environ = os.environ if environ is None else environ
        token = environ.get(TOKEN_ENV) or None
        return cls(base_url, iam_token=SecretStr(token) if token else None,
                   folder_id=folder_id or environ.get(FOLDER_ENV) or None,
                   node_id=node_id or environ.get(NODE_ENV) or None, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport with waiting ---------------------------------------------------------
    def request(self, method: str, path: str, *, json: Any = None, model: str | None = None) -> httpx.Response:
        """Send, retrying 502/503/504 and refused connections until the deadline; then check."""
        start = self._clock()
        delays = self.backoff.delays()
        while True:
            try:
                response = self._http.request(method, path, json=json)
                reason = f"HTTP {response.status_code}"
                if response.status_code not in RETRY_STATUSES:
                    return self._checked(response, model)
                retry_after = _retry_after(response)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                reason, retry_after = f"cannot connect ({exc.__class__.__name__})", None
                response = None
            remaining = self.backoff.deadline - (self._clock() - start)
            if remaining <= 0:
                raise ClientError(
                    f"{self.base_url}{path} still answers {reason} after "
                    f"{self.backoff.deadline:g}s: the model is still loading or the node is "
                    "unhealthy. Fix: check the node's logs and health, or wait longer (--deadline).",
                    response.status_code if response is not None else None,
                )
            delay = min(retry_after if retry_after is not None else next(delays),
                        self.backoff.maximum, remaining)
            if self.on_wait:
                self.on_wait(reason, delay, remaining)
            self._sleep(delay)

    def _checked(self, response: httpx.Response, model: str | None) -> httpx.Response:
        status = response.status_code
        if status < 400:
            return response
        url, detail = str(response.request.url), _error_text(response)
        if status == 401:
            why = ("no token was sent: $IAM_TOKEN is unset" if not self.has_token
                   else "the token in $IAM_TOKEN is invalid or expired")
            raise ClientError(
                f"{url} answered 401 Unauthorized ({detail}): {why}. Fix: create a fresh IAM "
                f"token and export it as {TOKEN_ENV} (IAM tokens expire after hours).", status)
        if status == 403:
            raise ClientError(
                f"{url} answered 403 Forbidden ({detail}): the token is valid but may not call "
                f"this node (folder {self.folder_id or 'unset'}, node {self.node_id or 'unset'}). "
                f"Fix: check --folder-id/${FOLDER_ENV} and --node-id/${NODE_ENV}, and that the "
                "token's account has a role allowing calls to the node.", status)
        if status == 404:
            if model and "model" in detail.lower():
                raise ClientError(
                    f"{url} answered 404: model {model!r} is not served there ({detail}). Fix: use "
                    "a model id the node lists (albert client models --url ...): the node "
                    "serves the routing-table id it was built with, not the hub repo.", status)
            raise ClientError(
                f"{url} answered 404 Not Found ({detail}). Fix: pass the node's base URL as "
                "--url (without /v1/...), and check --node-id.", status)
        raise ClientError(f"{url} answered {status}: {detail}", status)

    # --- OpenAI API ---------------------------------------------------------------------
    def models(self) -> list[str]:
        data = self.request("GET", "/v1/models").json()
        return [m["id"] for m in data.get("data", [])]

    def chat(self, model: str, messages: str | Sequence[Mapping[str, str]], *,
             system: str | None = None, **params: Any) -> dict:
        """``POST /v1/chat/completions``; a string is one user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        body = {"model": model, "messages": list(messages), **{k: v for k, v in params.items() if v is not None}}
        return self.request("POST", "/v1/chat/completions", json=body, model=model).json()

    def chat_text(self, model: str, messages: str | Sequence[Mapping[str, str]], **params: Any) -> str:
        data = self.chat(model, messages, **params)
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ClientError(f"{self.base_url}: unexpected chat answer: {str(data)[:300]}") from None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
