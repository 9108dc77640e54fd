"""An environment of two namespace hosts joined by a private link, serving the tiny model either
split over them as a host group (a Ray cluster: issue 17) or on the first host alone; the venv
runtime with the fake vLLM and the Ray of ``/opt/albert/ray-venv``. Used by
``tests/integration/test_ray_group_deploy.py`` and ``bench/ray_group.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from pyalbert.devtools.testhosts import NamespaceHost
from tests.integration.test_ray_cluster import RAY_BIN, RAY_VENV
from tests.support.runtimes import FAKE_VENV, REPO, STORAGE, TOOLS_BASE, fake_vllm_python

GCS = 47379
NODE_MANAGER = 47382
MODEL_PORT = 18461
API_PORT = 18490


#: the fake vLLM's interpreter with Ray importable (``FAKE_VLLM_RAY=1``): the Ray venv's
#: packages on its path, the same Python as the Ray nodes'
FAKE_RAY_VENV = FAKE_VENV.with_name(FAKE_VENV.name.replace("fake-vllm-venv", "fake-vllm-ray-venv"))


def fake_vllm_ray_python() -> str:
    """A venv whose ``python -m vllm.entrypoints.openai.api_server`` is the fake vLLM, with Ray."""
    fake_vllm_python()  # the cache folder, readable by the deploy user
    python = FAKE_RAY_VENV / "bin" / "python"
    base = (RAY_VENV / "pyvenv.cfg").read_text().split("executable = ")[1].split()[0]
    if not python.exists():
        subprocess.run([base, "-m", "venv", "--without-pip", str(FAKE_RAY_VENV)],
                       check=True, capture_output=True, timeout=60)
    site = next((FAKE_RAY_VENV / "lib").glob("python3*/site-packages"))
    ray_site = next((RAY_VENV / "lib").glob("python3*/site-packages"))
    # addsitedir: the Ray venv's own .pth files too (google's namespace packages)
    (site / "albert_fake_vllm.pth").write_text(
        f"{REPO / 'tests/support/fake_vllm'}\nimport site; site.addsitedir({str(ray_site)!r})\n")
    FAKE_RAY_VENV.chmod(0o755)
    return str(python)


def environment(a: NamespaceHost, b: NamespaceHost, head_ip: str, worker_ip: str, *,
                group: bool = True, ray_engine: bool = False) -> str:
    """``group``: the model on both hosts over Ray; else on ``a`` only (``b`` left out).
    ``ray_engine``: the fake vLLM places its workers on the cluster like vLLM (needs ``group``)."""
    hosts = f"""
[[hosts]]
name = "{a.name}"
address = "{a.address}"
private_address = "{head_ip}"
services = ["vllm", "api"]
"""
    if group:
        hosts += f"""
[[hosts]]
name = "{b.name}"
address = "{b.address}"
private_address = "{worker_ip}"
services = ["vllm"]
"""
    placement = 'placement = { "tiny" = { group = "ab" } }' if group else ""
    groups = f'[groups.ab]\nhosts = ["{a.name}", "{b.name}"]\n' if group else ""
    return f"""
tier = "testing"
runtime = "venv"
storage_dir = "{STORAGE}"
{placement}

[vllm]
python = "{fake_vllm_ray_python() if ray_engine else fake_vllm_python()}"

[api]
port = {API_PORT}

[deploy]
ready_timeout_s = 150
base_dir = "{TOOLS_BASE}"

[ray]
executable = "{RAY_BIN}"
interface = "priv0"
num_cpus = 1

[ray.ports]
gcs = {GCS}
client_server = 47380
object_manager = 47381
node_manager = {NODE_MANAGER}
runtime_env_agent = 47383
dashboard_agent_grpc = 47384
dashboard_agent_listen = 47385
metrics_export = 47386
min_worker = 47400
max_worker = 47420

{groups}
{hosts}"""


#: the fake's Ray executor, and a few seconds of "loading" before it listens (as vLLM)
RAY_ENGINE_ENV = {"FAKE_VLLM_RAY": "1", "FAKE_VLLM_START_DELAY": "4"}


def write_config(root: Path, name: str, a: NamespaceHost, b: NamespaceHost, head_ip: str,
                 worker_ip: str, *, group: bool = True, ray_engine: bool = False) -> Path:
    """``environments/<name>.toml`` and the routing table (the tiny model, PP 2 in a group)."""
    (root / "environments").mkdir(parents=True, exist_ok=True)
    (root / "environments" / f"{name}.toml").write_text(
        environment(a, b, head_ip, worker_ip, group=group, ray_engine=ray_engine))
    tiny = {"model": "albert-test/tiny", "port": MODEL_PORT, "max_model_len": 512}
    if group:
        tiny["pipeline_parallel_size"] = 2
    if ray_engine:
        tiny["env"] = RAY_ENGINE_ENV
    (root / "llm_routing_table.json").write_text(json.dumps({"tiny": tiny}))
    (STORAGE / "tiny").mkdir(parents=True, exist_ok=True)
    return root


def gateway_chat(address: str, port: int) -> httpx.Response | str:
    """A chat with the group's model ``tiny`` through the gateway at ``address:port``, or why
    none came back (bounded: never a hang)."""
    try:
        return httpx.post(f"http://{address}:{port}/v1/chat/completions", timeout=20,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
