"""What every smoke check shares: a timed result, the one-line failure, the HTTP client."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

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


class CheckFailed(Exception):
    """A check's one-line reason."""


def shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_text(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


#: errors that mean "not up (yet)": waited out until the deadline
NOT_UP = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


def http_client(timeout_s: float, **kwargs) -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), **kwargs)


class Checks:
    """Timed checks appended to ``results``: a check returns its detail or raises ``CheckFailed``."""

    detail_limit = 160

    def __init__(self, poll_s: float, sleep: Callable[[float], None]):
        self.poll_s = poll_s
        self.sleep = sleep
        self.results: list[CheckResult] = []

    def _check(self, name: str, func: Callable[[], str], prefix: str = "") -> CheckResult:
        start = time.perf_counter()
        try:
            detail, status = func(), "passed"
        except CheckFailed as exc:
            detail, status = prefix + str(exc), "failed"
        except httpx.HTTPError as exc:
            detail, status = prefix + error_text(exc), "failed"
        result = CheckResult(name, status, time.perf_counter() - start, shorten(detail, self.detail_limit))
        self.results.append(result)
        return result

    def _skip(self, name: str, reason: str) -> None:
        self.results.append(CheckResult(name, "skipped", 0.0, reason))


def model_ids(response: httpx.Response) -> set[str]:
    try:
        return {m["id"] for m in response.json()["data"]}
    except (ValueError, KeyError, TypeError):
        return set()
