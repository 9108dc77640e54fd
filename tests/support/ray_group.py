"""An environment of two namespace hosts joined by a private link, serving the tiny model either
split over them as a host group (a Ray cluster: issue 17) or on the first host alone; the venv
runtime with the fake vLLM and the Ray of ``/opt/albert/ray-venv``. Used by
``tests/integration/test_ray_group_deploy.py`` and ``bench/ray_group.py``."""

from __future__ import annotations

import json
from pathlib import Path

from pyalbert.devtools.testhosts import NamespaceHost
from tests.integration.test_ray_cluster import RAY_BIN
from tests.support.runtimes import STORAGE, TOOLS_BASE, fake_vllm_python

GCS = 47379
NODE_MANAGER = 47382
MODEL_PORT = 18461
API_PORT = 18490


def environment(a: NamespaceHost, b: NamespaceHost, head_ip: str, worker_ip: str, *,
                group: bool = True) -> str:
    """``group``: the model on both hosts over Ray; else on ``a`` only (``b`` left out)."""
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
python = "{fake_vllm_python()}"

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


def write_config(root: Path, name: str, a: NamespaceHost, b: NamespaceHost, head_ip: str,
                 worker_ip: str, *, group: bool = True) -> Path:
    """``environments/<name>.toml`` and the routing table (the tiny model, PP 2 in a group)."""
    (root / "environments").mkdir(parents=True, exist_ok=True)
    (root / "environments" / f"{name}.toml").write_text(
        environment(a, b, head_ip, worker_ip, group=group))
    tiny = {"model": "albert-test/tiny", "port": MODEL_PORT, "max_model_len": 512}
    if group:
        tiny["pipeline_parallel_size"] = 2
    (root / "llm_routing_table.json").write_text(json.dumps({"tiny": tiny}))
    (STORAGE / "tiny").mkdir(parents=True, exist_ok=True)
    return root
