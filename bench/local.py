"""The local environment's main command: first run vs re-run, and the tool's overhead on vLLM.

One command (root): ``.venv/bin/python bench/local.py``. It tears the local environment down,
runs ``albert local up`` twice (first run, then the no-op re-run), then starts the same vLLM
server directly (same interpreter, arguments and model, no tool around it) and times it to ready.
The ``deploy vllm`` phase minus that direct start is what the tool adds on top of vLLM's own
start (SSH, lock, files, supervisor, readiness polling). Figures side by side, ratios.
``--keep`` leaves the environment up at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyalbert.commands.vllm import server_args  # noqa: E402
from pyalbert.devtools.localenv import LocalEnv  # noqa: E402

PORT = 18301


def phases(report) -> dict[str, float]:
    return {p.name: p.seconds for p in report.phases}


def direct_vllm_start(local: LocalEnv, deadline_s: float = 900) -> float:
    """Seconds from process start to /health 200 and /v1/models listing the model."""
    env = local.spec.env
    model_id, model = next(iter(local.spec.models))
    args = server_args(model_id, model, model_path=f"{env.storage_dir}/{model_id}", port=PORT,
                       host="127.0.0.1", extra_args=env.vllm.extra_args)
    proc_env = {**os.environ, **env.vllm.env, **model.env}
    start = time.monotonic()
    proc = subprocess.Popen([env.vllm.python, "-m", "vllm.entrypoints.openai.api_server", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=proc_env)
    try:
        while time.monotonic() - start < deadline_s:
            if proc.poll() is not None:
                raise SystemExit(f"direct vLLM exited with {proc.returncode}")
            try:
                if (httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200
                        and model_id in httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=2).text):
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit("direct vLLM not ready in time")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the local environment up")
    args = parser.parse_args()
    local = LocalEnv()
    local.down()
    t0 = time.monotonic()
    first = phases(LocalEnv().up())
    first_total = time.monotonic() - t0
    t0 = time.monotonic()
    again = phases(LocalEnv().up())
    again_total = time.monotonic() - t0
    direct = direct_vllm_start(local)
    if not args.keep:
        local.down()

    rows = [(name, first.get(name, 0.0), again.get(name, 0.0)) for name in first]
    print("\n== albert local up: first run vs re-run (seconds) ==")
    print(f"{'phase':<14}{'first':>10}{'re-run':>10}")
    for name, a, b in rows:
        print(f"{name:<14}{a:>10.1f}{b:>10.1f}")
    print(f"{'total':<14}{first_total:>10.1f}{again_total:>10.1f}   re-run / first = "
          f"{again_total / first_total:.2f}")
    deploy = first.get("deploy vllm", 0.0)
    print("\n== vLLM start: through the tool vs direct (seconds) ==")
    print(f"deploy vllm phase (SSH, lock, files, supervisor, readiness): {deploy:.1f}")
    print(f"the same server started directly, to ready:                 {direct:.1f}")
    print(f"tool overhead: {deploy - direct:+.1f} s ({deploy / direct:.2f}x the server's own start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
