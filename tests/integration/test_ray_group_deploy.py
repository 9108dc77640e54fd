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
from pathlib import Path

import httpx
import pytest

from pyalbert.devtools.testhosts import NamespaceHost
from pyalbert.engine.operations import down_env, status_env
from tests.integration.test_ray_cluster import RAY_BIN, link_hosts, wait_for
from tests.support import ray_group
from tests.support.ray_group import (
    API_PORT,
    GCS,
    NODE_MANAGER,
    check_a_failed_change_rolls_the_group_back,
    serving,
    write_config,
)
from tests.support.runtimes import TOOLS_BASE, fake_vllm_python, tools_on

pytestmark = pytest.mark.skipif(not Path(RAY_BIN).exists(), reason=f"no Ray at {RAY_BIN}")

ENV = "raygrp"


class Group(ray_group.Group):
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


@pytest.fixture(scope="module")
def group(make_host, tmp_path_factory):
    a, b = make_host(docker=False), make_host(docker=False)
    head_ip, worker_ip = link_hosts(a, b)
    python = fake_vllm_python()
    for host in (a, b):
        tools_on(host, python, tmp_path_factory.mktemp(f"tools-{host.name}"))
    root = write_config(tmp_path_factory.mktemp("raygrp-config"), ENV, a, b, head_ip, worker_ip,
                        ray_engine=True)
    with serving(Group(a, b, head_ip, worker_ip, root, ENV, GCS, API_PORT, [RAY_BIN])) as g:
        yield g


def test_deploy_forms_the_cluster_then_starts_vllm_on_the_head(group):
    results = group.deploy("group deployed")
    assert {r.host: r.status for r in results} == {group.a.name: "deployed",
                                                   group.b.name: "deployed"}
    status = group.nodes()
    assert status is not None and sorted(n.cpus for n in status.nodes) == [1, 1]
    head, worker = group.state(group.a), group.state(group.b)
    node = f"albert-{ENV}-ray-ab"
    assert {node, f"albert-{ENV}-vllm-tiny"} <= set(head)
    assert set(worker) == {node}  # a worker host runs its node only
    # the head forgets its last start's address file first (else a restart may refuse)
    head_cmd, worker_cmd = head[node]["cmd"], worker[node]["cmd"]
    assert head_cmd[:4] == ["sh", "-c", 'rm -f -- "$0"; exec "$@"',
                            f"/tmp/ray-{ENV}-{group.a.name}/ray_current_cluster"]
    at = head_cmd.index(RAY_BIN)
    assert head_cmd[at:at + 3] == [RAY_BIN, "start", "--head"]
    at = worker_cmd.index(RAY_BIN)
    assert worker_cmd[at:at + 4] == [RAY_BIN, "start", "--address", group.address]
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
    results = group.deploy("no-op re-run")
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
    before, first = group.state(group.b)[node], group.state(group.a)[server]
    formed = group.nodes()
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
    assert restarted["pid"] != first["pid"] and restarted["restarts"] >= 1
    log = group.a.run(["cat", f"{TOOLS_BASE}/run-{ENV}/{server}.log"]).stdout
    assert "EngineDeadError" in log, log[-2000:]
    # the group re-forms with a new worker node (the dead one is listed a while)
    group.two_nodes(not_as=formed)


def test_a_failed_change_rolls_the_whole_group_back(group):
    """The hosts share a PID namespace here: the worker's raylet, which names the head's
    address, is visible when the head's previous node starts again (``ray start --head`` would
    refuse: "already running", unless its last address file is gone)."""
    def log(unit: str) -> list[str]:
        return ["sh", "-c", f"tail -n 30 {TOOLS_BASE}/run-{ENV}/albert-{ENV}-{unit}.log"]
    check_a_failed_change_rolls_the_group_back(group, TOOLS_BASE, log("ray-ab"), log("vllm-tiny"))


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
