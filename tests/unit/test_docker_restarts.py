"""The docker runtime's unit listing says how each container was restarted (issue 15 item 2).

``docker ps`` shows a crash-looping container as ``running`` ("Up Less than a second") between two
of its deaths; its restarts come from ``docker inspect`` (RestartCount, State.StartedAt, Created),
listed after the ``ps`` lines. Outputs captured from docker 20.10 with a container that exits
0.3 s after each start under ``--restart unless-stopped``.
"""

from __future__ import annotations

from pyalbert.commands import docker
from pyalbert.engine.unit_status import verdict
from pyalbert.runtimes.docker import DockerRuntime

PS_RUNNING = ('{"Command":"\\"sh -c \'sleep 0.3; exit 1\'\\"","CreatedAt":"2026-12-02 02:19:19 +0000 UTC",'
              '"ID":"75351f29582e","Image":"albert-test/vllm:1","Labels":"albert.env=k9cap,'
              'albert.service=vllm,albert.model=m-c,albert.release=r1,albert.config-hash=abc",'
              '"LocalVolumes":"0","Mounts":"","Names":"albert-k9cap-vllm-m-c","Networks":"bridge",'
              '"Platform":null,"Ports":"127.0.0.1:18442->18442/tcp","RunningFor":"5 seconds ago",'
              '"Size":"0B","State":"running","Status":"Up Less than a second"}')
INSPECT_LOOPING = ('{"Name": "/albert-k9cap-vllm-m-c", "RestartCount": 3, '
                   '"StartedAt": "2026-12-02T02:19:24.327312645Z", "Created": "2026-12-02T02:19:19.401024323Z"}')
INSPECT_FRESH = ('{"Name": "/albert-k9cap-vllm-m-c", "RestartCount": 0, '
                 '"StartedAt": "2026-12-02T02:19:19.6Z", "Created": "2026-12-02T02:19:19.401024323Z"}')
STARTED, CREATED = 1796177964.327312, 1796177959.401024


def test_list_units_golden():
    assert DockerRuntime().list_units("k9cap").render() == (
        "docker ps -a --no-trunc --filter label=albert.env=k9cap --format '{{json .}}' && "
        "{ docker ps -aq --no-trunc --filter label=albert.env=k9cap | xargs -r docker inspect "
        "--format '{\"Name\": {{json .Name}}, \"RestartCount\": {{.RestartCount}}, "
        "\"StartedAt\": {{json .State.StartedAt}}, \"Created\": {{json .Created}}}' 2>/dev/null "
        "|| true ; }")


def test_restarts_dated_by_the_last_start_and_earlier_ones_by_the_creation():
    assert docker.parse_restarts_of(INSPECT_LOOPING) == {
        "albert-k9cap-vllm-m-c": [CREATED, CREATED, STARTED]}
    assert docker.parse_restarts_of(INSPECT_FRESH) == {"albert-k9cap-vllm-m-c": []}
    zero = INSPECT_LOOPING.replace("2026-12-02T02:19:24.327312645Z", "0001-01-01T00:00:00Z")
    assert docker.parse_restarts_of(zero) == {"albert-k9cap-vllm-m-c": []}
    assert docker.parse_restarts_of("Error: No such object\n" + PS_RUNNING) == {}


def test_a_running_container_that_keeps_restarting_is_crash_looping():
    rows = DockerRuntime().parse_units(f"{PS_RUNNING}\n{INSPECT_LOOPING}\n")
    assert [r["name"] for r in rows] == ["albert-k9cap-vllm-m-c"]  # the restarts line is no unit
    assert rows[0]["state"] == "running" and rows[0]["restart_times"] == [CREATED, CREATED, STARTED]
    assert verdict(rows[0], now=STARTED + 5) == "crash-looping"
    # long after: the restarts are old news, the server runs
    assert verdict(rows[0], now=STARTED + 3600) == "running"


def test_a_container_never_restarted_is_running():
    rows = DockerRuntime().parse_units(f"{PS_RUNNING}\n{INSPECT_FRESH}\n")
    assert rows[0]["restart_times"] == [] and verdict(rows[0], now=STARTED) == "running"
    # the inspect part missing (removed meanwhile): no restart known
    assert DockerRuntime().parse_units(PS_RUNNING)[0]["restart_times"] == []
