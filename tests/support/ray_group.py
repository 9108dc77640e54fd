"""Two namespace hosts joined by a private link, serving the tiny model split over them as a host
group (a Ray cluster: issue 17), or on the first host alone: the config (venv runtime, the fake
vLLM and the Ray of ``/opt/albert/ray-venv``; the Ray ports of the docker runtime's test too), the
:class:`Group` the tests look at (its ``ray status``, a chat through its gateway), and the
environment a deploy of it runs in. Used by ``tests/integration/test_ray_group_deploy.py``,
``tests/integration/test_ray_group_docker.py`` and ``bench/ray_group.py``."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pyalbert.commands import ray, release
from pyalbert.config import load_spec
from pyalbert.devtools.testhosts import NamespaceHost
from pyalbert.engine.operations import deploy_env, down_env
from pyalbert.errors import AlbertError
from tests.integration.test_ray_cluster import RAY_BIN, RAY_VENV, wait_for
from tests.support.hosts import ssh_environ
from tests.support.runtimes import FAKE_VENV, REPO, STORAGE, TOOLS_BASE, fake_vllm_python


def ray_ports(base: int) -> dict[str, int]:
    """``[ray.ports]`` of a test environment: every Ray port in the block of ``base`` (47000 the
    venv group tests and the bench, 48000 the docker ones: both may run at once)."""
    return {"gcs": base + 379, "client_server": base + 380, "object_manager": base + 381,
            "node_manager": base + 382, "runtime_env_agent": base + 383,
            "dashboard_agent_grpc": base + 384, "dashboard_agent_listen": base + 385,
            "metrics_export": base + 386, "min_worker": base + 400, "max_worker": base + 420}


def ray_toml(base: int, executable: str | None = None) -> str:
    """``[ray]`` (the private link ``priv0``, one CPU a node) and ``[ray.ports]`` (:func:`ray_ports`)."""
    exe = f'executable = "{executable}"\n' if executable else ""
    ports = "".join(f"{key} = {port}\n" for key, port in ray_ports(base).items())
    return f'[ray]\n{exe}interface = "priv0"\nnum_cpus = 1\n\n[ray.ports]\n{ports}'


VENV_PORTS = 47000
GCS = ray_ports(VENV_PORTS)["gcs"]
NODE_MANAGER = ray_ports(VENV_PORTS)["node_manager"]
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

{ray_toml(VENV_PORTS, RAY_BIN)}
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


@dataclass
class Group:
    """Two hosts serving the environment ``env``'s model split over them, seen by the tests:
    ``ray`` is the head's ``ray`` command (the venv's, or ``docker exec NODE ray``)."""

    a: NamespaceHost
    b: NamespaceHost
    head_ip: str
    worker_ip: str
    root: Path
    env: str
    gcs: int
    api_port: int
    ray: Sequence[str]

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs}"

    def spec(self):
        return load_spec(self.env, self.root)

    def chat(self) -> httpx.Response | str:
        return gateway_chat(self.a.address, self.api_port)

    def deploy(self, what: str) -> list:
        """``fab deploy`` of the environment, its time printed as ``what in N s``; the hosts'
        results."""
        t0 = time.monotonic()
        results = deploy_env(self.spec(), quiet=True)
        print(f"\n{what} in {time.monotonic() - t0:.1f}s")
        return results

    def nodes(self) -> ray.ClusterStatus | None:
        """``ray status`` at the head (None: no answer, or none Ray can give yet)."""
        cmd = ray.status(self.address, ray=list(self.ray))
        res = self.a.run(["sh", "-c", cmd.render()], check=False, timeout=60)
        try:
            return ray.parse_status(res.stdout) if res.returncode == 0 else None
        except ray.RayStatusError:
            return None

    def two_nodes(self, *, not_as: ray.ClusterStatus | None = None,
                  timeout: float = 150) -> ray.ClusterStatus:
        """Wait until ``ray status`` lists the group's two nodes of one CPU each (other nodes
        than ``not_as`` lists: one was replaced). Ray lists a dead or replaced node until its
        health checks give up on it, possibly after the model serves again."""
        before = {n.node_id for n in not_as.nodes} if not_as else None
        seen: list[str] = []

        def whole():
            st = self.nodes()
            seen[:] = [repr(st)]
            return (st is not None and sorted(n.cpus for n in st.nodes) == [1, 1]
                    and {n.node_id for n in st.nodes} != before and st)

        try:
            return wait_for("ray status to list the group's two nodes", whole, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last ray status: {seen[0] if seen else None}") from None


@contextlib.contextmanager
def group_environ(hosts: Sequence[NamespaceHost], root: Path) -> Iterator[None]:
    """The deploy's SSH settings for ``hosts`` (and a short readiness poll) in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ssh_environ(hosts, root).items():
            mp.setenv(key, value)
        mp.setenv("ALBERT_READY_POLL_S", "0.5")
        yield


@contextlib.contextmanager
def serving(group: Group) -> Iterator[Group]:
    """A module fixture's body: the group's deploy environment while the tests use it, then
    ``fab down``."""
    with group_environ([group.a, group.b], group.root):
        try:
            yield group
        finally:
            down_env(group.spec())


def current_release(host: NamespaceHost, base: str) -> str:
    link = host.run(["sh", "-c", release.current(base).render()], check=False).stdout
    return release.parse_current(link)


def check_a_failed_change_rolls_the_group_back(group: Group, base: str, node_log: Sequence[str],
                                               server_log: Sequence[str]) -> None:
    """A change of the group's nodes (both hosts: ``num_cpus`` 1 -> 2) whose server then fails
    on the head (the fake vLLM exits): the worker host does not record the new release while the
    head rolls back, it rolls back with it; no host records the failed release; the rollback
    itself brings the previous release back (both nodes restart, the head's although a raylet
    naming its address may be visible), so the group serves it without a re-run, and a re-run
    changes nothing. ``base``: the hosts' deploy folder; ``node_log``, ``server_log``: commands
    printing the head's node's and server's last lines."""
    toml = group.root / "environments" / f"{group.env}.toml"
    routing = group.root / "llm_routing_table.json"
    good_toml, good_routing = toml.read_text(), routing.read_text()
    before = {h.name: current_release(h, base) for h in (group.a, group.b)}
    table = json.loads(good_routing)
    table["tiny"]["env"] = {**table["tiny"]["env"], "FAKE_VLLM_FAIL": "exit"}
    toml.write_text(good_toml.replace("num_cpus = 1", "num_cpus = 2"))  # both nodes change
    routing.write_text(json.dumps(table))
    try:
        with pytest.raises(AlbertError) as failed:
            group.deploy("the failed change")
    finally:
        toml.write_text(good_toml)
        routing.write_text(good_routing)
    text = str(failed.value)
    log = group.a.run(list(node_log), check=False)
    print(f"the failed deploy: {text}\nthe head's node log:\n{log.stdout}{log.stderr}")
    # the worker does not keep a release its group does not run: it rolls back with the head
    assert f"{group.b.name} (rolled back)" in text, text
    assert f"{group.a.name} of the same host group" in text, text
    assert "NOT serving" not in text and f"{group.a.name} (rolled back)" in text, text
    assert {h.name: current_release(h, base) for h in (group.a, group.b)} == before
    # the rollback itself brought the previous release back: it serves, nothing to re-run
    t0 = time.monotonic()
    try:
        answer = wait_for("the group to serve the previous release",
                          lambda: isinstance(r := group.chat(), httpx.Response)
                          and r.status_code == 200 and r, 150)
    except AssertionError:
        log = group.a.run(list(server_log), check=False)
        print(f"the head's server:\n{log.stdout}{log.stderr}\nray status: {group.nodes()}")
        raise
    print(f"the previous release answered {time.monotonic() - t0:.1f}s after the rollback")
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
    group.two_nodes()  # the previous nodes (1 CPU each)
    assert {r.status for r in group.deploy("a re-run after the rollback")} == {"unchanged"}
