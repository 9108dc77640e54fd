"""Deploy builders (docker, lock, release, health, gpu, api): whole strings, no SSH."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pyalbert.commands import api, docker, gpu, health, lock, release
from pyalbert.commands.base import Cmd
from pyalbert.remote import LocalRunner


def test_docker_run_whole_string():
    cmd = docker.run("albert-x-vllm-m", "vllm/vllm-openai:v1", ["--port", "8001"],
                     ports=["8001:8001"], volumes=["/data/m:/models/m:ro"], env_file="/r/m.env",
                     gpu_ids=(0, 1), ipc_host=True, labels={"albert.env": "x"})
    assert cmd.render() == (
        "docker run -d --name albert-x-vllm-m --restart unless-stopped --ipc=host -p 8001:8001 "
        "-v /data/m:/models/m:ro --gpus '\"device=0,1\"' --env-file /r/m.env "
        "--label albert.env=x vllm/vllm-openai:v1 --port 8001")


def test_docker_run_without_gpus_has_no_gpus_flag_and_optional_entrypoint():
    cmd = docker.run("n", "img", ["a"], network="host", entrypoint="python3", restart="")
    assert cmd.render() == "docker run -d --name n --network host --entrypoint python3 img a"


def test_run_in_another_containers_pid_namespace():
    cmd = docker.run("n", "img", network="host", pid="container:node", restart="")
    assert cmd.render() == "docker run -d --name n --network host --pid container:node img"


def test_stop_is_graceful_then_forced_and_never_fails():
    assert docker.stop("c", 7).render() == (
        "{ docker stop -t 7 c >/dev/null 2>&1 && docker rm -f c >/dev/null 2>&1 ; } || "
        "docker rm -f c >/dev/null 2>&1 || true")


@pytest.mark.parametrize("out, expected", [
    ("true abc123 20250101-000000-aaaaaa\n", (True, "abc123", "20250101-000000-aaaaaa")),
    ("false abc123 r1", (False, "abc123", "r1")),
    ("true <no value> <no value>", (True, "", "")),
    ("", (False, "", "")),
], ids=["running", "stopped", "no-labels", "absent"])
def test_parse_state(out, expected):
    assert docker.parse_state(out) == expected


def test_inspect_ps_logs_and_images():
    assert docker.inspect_state("c").render() == (
        "docker inspect --format '{{.State.Running}} {{index .Config.Labels \"albert.config-hash\"}}"
        " {{index .Config.Labels \"albert.release\"}}' c")
    assert docker.ps("prod", "vllm").render() == (
        "docker ps -a --no-trunc --filter label=albert.env=prod --filter label=albert.service=vllm "
        "--format '{{json .}}'")
    assert docker.logs("c", 20, follow=True).render() == "docker logs --tail 20 -f c 2>&1"
    assert docker.ensure_image("i:1").render() == (
        "docker image inspect --format '{{.Id}}' i:1 >/dev/null || docker pull -q i:1")


def test_lock_acquire_is_one_atomic_rename_with_details_on_stdin():
    cmd = lock.acquire("/b", '{"who": "me"}')
    assert cmd.render() == ("sh -c 'mkdir -p /b && t=$(mktemp -d /b/.deploy.lock.XXXXXX) && "
                            "cat > \"$t/details.json\" && mv -T \"$t\" /b/deploy.lock 2>/dev/null "
                            "|| { rm -rf \"$t\"; exit 1; }'")
    assert cmd.stdin == '{"who": "me"}'
    assert lock.release("/b").render() == "rm -rf /b/deploy.lock || true"
    assert lock.show("/b").render() == "cat /b/deploy.lock/details.json 2>/dev/null"


def test_lock_really_excludes_a_second_holder(tmp_path):
    run = LocalRunner()
    base = str(tmp_path / "albert")
    first = lock.details(who="ana", when="t", release="r1", message="hotfix")
    assert run.run(lock.acquire(base, first), check=False).ok
    assert not run.run(lock.acquire(base, lock.details(who="bob", when="t", release="r2")),
                       check=False).ok
    holder = lock.describe_holder(run.run(lock.show(base)).stdout)
    assert holder == "ana since t (release r1): hotfix"
    run.run(lock.release(base))
    assert run.run(lock.acquire(base, first), check=False).ok
    assert [p.name for p in (tmp_path / "albert").iterdir()] == ["deploy.lock"]  # no leftovers


def test_a_lock_never_exists_without_its_details(tmp_path):
    """A deployer killed while writing its details (here: the details cannot be written) leaves
    no lock behind, and a stray folder of a killed acquirer does not count as a lock."""
    run = LocalRunner()
    base = tmp_path / "albert"
    base.mkdir()
    (base / ".deploy.lock.dead01").mkdir()  # what a kill between mktemp and the rename leaves
    script = str(lock.acquire(str(base), "x").tokens[-1])
    assert 'cat > "$t/details.json"' in script
    failing = Cmd.of("sh", "-c", script.replace('cat > "$t/details.json"', "false"))
    assert not run.run(failing, check=False).ok
    assert not (base / "deploy.lock").exists()
    assert run.run(lock.acquire(str(base), lock.details(who="ana", when="t", release="r1")),
                   check=False).ok
    assert "ana" in lock.describe_holder(run.run(lock.show(str(base))).stdout)


def test_release_put_writes_secret_files_0600_with_content_only_on_stdin(tmp_path):
    path = str(tmp_path / "r" / "deep" / "m.env")
    cmd = release.put(path, "HF_TOKEN=hf_secret\n", secret=True)
    assert "hf_secret" not in cmd.render() and "hf_secret" not in cmd.display()
    assert "[secret, 19 bytes]" in cmd.display()
    LocalRunner().run(cmd)
    assert (tmp_path / "r" / "deep" / "m.env").read_text() == "HF_TOKEN=hf_secret\n"
    assert oct((tmp_path / "r" / "deep" / "m.env").stat().st_mode & 0o777) == "0o600"


def test_release_ids_current_and_prune(tmp_path):
    run, base = LocalRunner(), str(tmp_path)
    assert release.parse_ids(run.run(release.list_ids(base)).stdout) == []
    for rid in ("20250103-000000-c", "20250101-000000-a", "20250102-000000-b"):
        run.run(release.ensure_dir(release.release_dir(base, rid)))
    ids = release.parse_ids(run.run(release.list_ids(base)).stdout)
    assert ids == ["20250101-000000-a", "20250102-000000-b", "20250103-000000-c"]
    run.run(release.set_current(base, ids[-1]))
    assert release.parse_current(run.run(release.current(base)).stdout) == ids[-1]
    assert release.to_prune(ids, 1, protect=[ids[0]]) == [ids[1]]
    assert release.to_prune(ids, 5) == []
    assert release.prune(base, []) is None
    assert release.prune("/b", ["x"]).render() == "rm -rf /b/releases/x"


def test_health_probes_and_parsers():
    check = health.ReadyCheck(8001, "m")
    assert check.health().render() == (
        "curl -s -o /dev/null -w '%{http_code}' --max-time 3 http://127.0.0.1:8001/health || true")
    assert check.models().render() == "curl -s --max-time 3 http://127.0.0.1:8001/v1/models || true"
    assert health.parse_status("200") == 200 and health.parse_status("000") == 0
    assert health.parse_status("") == 0
    assert health.models_listed('{"data": [{"id": "m"}, {"id": "n"}]}') == ["m", "n"]
    assert health.models_listed("<html>") == [] and health.models_listed('{"data": 3}') == []
    assert health.port_listeners(80).render() == "ss -Hltnp 'sport = :80'"
    assert health.parse_free_kib("/dev/sda1 100 50 2048 3% /") == 2048
    assert health.parse_free_kib("") == 0


def test_free_kib_walks_up_to_an_existing_folder(tmp_path):
    out = LocalRunner().run(health.free_kib(str(tmp_path / "not" / "yet"))).stdout
    assert health.parse_free_kib(out) > 0


NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("current, expected", [
    (None, "take"),
    (gpu.Lease("staging", "ana", "42", "2025-01-01T13:00:00+00:00"), "renew"),
    (gpu.Lease("staging", "bob", "41", "2025-01-01T13:00:00+00:00"), "refuse"),
    (gpu.Lease("staging", "bob", "41", "2025-01-01T11:00:00+00:00"), "takeover"),
], ids=["free", "ours", "other-live", "other-expired"])
def test_gpu_lease_decision(current, expected):
    assert gpu.decide(current, "42", NOW) == expected


def test_gpu_lease_compare_and_swap(tmp_path):
    run, base = LocalRunner(), str(tmp_path)
    mine = gpu.new_lease("staging", "ana", "42", 60, NOW)
    assert mine.expires == "2025-01-01T13:00:00+00:00"
    assert run.run(gpu.write(base, mine, None), check=False).ok
    assert gpu.parse_lease(run.run(gpu.read(base)).stdout) == mine
    other = gpu.new_lease("staging", "bob", "43", 60, NOW)
    assert run.run(gpu.write(base, other, None), check=False).exit_code == 3  # changed meanwhile
    assert run.run(gpu.write(base, other, "42"), check=False).ok
    assert gpu.parse_lease(run.run(gpu.read(base)).stdout).pipeline == "43"
    run.run(gpu.remove(base))
    assert gpu.parse_lease(run.run(gpu.read(base)).stdout) is None


def test_gpu_memory_and_hook():
    assert gpu.free_memory().render() == (
        "nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits")
    assert gpu.parse_free_memory("0, 70000, 81920\n1, 100, 81920\n") == {
        0: (70000, 81920), 1: (100, 81920)}
    assert gpu.hook("cloud attach", {"B": "2", "A": "1"}).render() == (
        "env A=1 B=2 sh -c 'cloud attach'")


def test_api_builders():
    assert api.spare_port(8080, "blue") == 24160 and api.spare_port(8080, "green") == 24161
    assert api.other("blue") == "green"
    assert api.serve_args("prod", 8080, keys=True, whitelist=False, workers=2) == [
        "albert", "api", "--env", "prod", "--config-dir", "/etc/albert/config",
        "--backends", "/etc/albert/backends.json", "--keys", "/etc/albert/keys.json",
        "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
    assert api.serve_args("prod", 8080, keys=False, whitelist=False, uds="/e/sockets/blue.sock")[-7:] == [
        "--host", "0.0.0.0", "--port", "8080", "--uds", "/e/sockets/blue.sock", "--workers", "1"][-7:]
    assert api.socket_path("/srv/albert/edge-prod", "green") == "/srv/albert/edge-prod/sockets/green.sock"


def test_spare_ports_stay_below_the_ephemeral_range():
    """An outgoing connection may hold any port from 32768: a colour must never need one."""
    for public in range(1024, 65536):
        ports = {api.spare_port(public, c) for c in api.COLOURS}
        assert len(ports) == 2 and all(20000 <= p < 32768 for p in ports), public


def test_a_left_lock_names_its_holder_pid_and_age():
    """A lock left by a dead deployer: who, since when, how long ago, which pid (issue 15)."""
    from datetime import datetime, timezone

    doc = lock.details(who="ana@box", when="2026-12-01T20:00:00+00:00", release="r1", pid=4242)
    now = datetime(2026, 12, 1, 20, 47, tzinfo=timezone.utc)
    assert lock.describe_holder(doc, now=now) == (
        "ana@box since 2026-12-01T20:00:00+00:00 (47 min ago) (release r1, pid 4242)")
    assert lock.age("2026-12-01T20:46:30+00:00", now) == "30 s"
    assert lock.age("2026-11-30T20:00:00+00:00", now) == "24.8 h"
    assert lock.age("t", now) == ""
