"""Namespace test hosts: isolation, SSH with checked host keys, idempotent up/down, clean teardown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from pyalbert.cli import main
from pyalbert.commands.base import Cmd
from pyalbert.config import load_spec
from pyalbert.devtools.testhosts import (
    DEFAULT_ROOT,
    NamespaceHost,
    claim_index,
    cleanup_stale,
    kept_paths,
    known_hosts_line,
    pid_alive,
    pids_in_namespaces,
    setup_script,
    veth_create_cmds,
)
from pyalbert.errors import AlbertError
from pyalbert.remote import SSHRunner
from tests.support.hosts import busybox_image, environment_toml

# --- pure builders (no root needed) ----------------------------------------------------------


def test_veth_commands_give_both_sides_an_address_and_no_route():
    rendered = [c.render() for c in veth_create_cmds(7)]
    assert rendered == [
        "ip link add albh7 type veth peer name albn7",
        "ip link set albn7 netns alb7",
        "ip -n alb7 link set albn7 name eth0",
        "ip -n alb7 addr replace 10.210.7.2/24 dev eth0",
        "ip -n alb7 link set eth0 up",
        "ip -n alb7 link set lo up",
        "ip addr replace 10.210.7.1/24 dev albh7",
        "ip link set albh7 up",
    ]
    assert not any("route" in r for r in rendered)


def test_setup_script_binds_tmp_and_run_last_and_drops_copied_namespaces():
    lines = setup_script("h1", Path("/var/lib/x/h1")).splitlines()
    binds = [line.split()[-1] for line in lines if line.startswith("mount --bind")]
    assert binds[-2:] == ["/tmp", "/run"]
    assert {"/etc/hosts", "/etc/hostname", "/etc/os-release", "/etc/ssh", "/var/lib/docker",
            "/home/gitlab", "/root/.ssh"} <= set(binds)
    assert lines.index("mount -t sysfs sysfs /sys") < lines.index(
        "mount --move /var/lib/x/h1/cgroup /sys/fs/cgroup")
    assert any("-t nsfs" in line and "umount" in line for line in lines)


def test_kept_paths_are_parked_before_the_binds_and_restored_read_only_after_them():
    lines = setup_script("h1", Path("/var/lib/x/h1"), [Path("/tmp/clone")]).splitlines()
    park = lines.index("mount --bind /tmp/clone /var/lib/x/h1/keep/0")
    restore = lines.index("mount --bind /var/lib/x/h1/keep/0 /tmp/clone")
    tmp_bind = lines.index("mount --bind /var/lib/x/h1/tmp /tmp")
    run_bind = lines.index("mount --bind /var/lib/x/h1/run /run")
    assert park < tmp_bind < run_bind < restore
    assert lines[restore - 1] == "mkdir -p /tmp/clone"
    assert lines[restore + 1] == "mount -o remount,bind,ro /tmp/clone"


@pytest.mark.parametrize(("paths", "kept"), [
    (["/srv/albert", "/usr"], []),
    (["/tmp/albert"], ["/tmp/albert"]),
    (["/tmp/albert/.venv", "/tmp/albert"], ["/tmp/albert"]),
    (["/run/user/0/albert", "/data/x"], ["/data/x", "/run/user/0/albert"]),
], ids=["not-hidden", "under-tmp", "venv-inside-checkout", "under-run-and-data"])
def test_kept_paths_are_the_outermost_hidden_ones(paths, kept):
    assert [str(p) for p in kept_paths([Path(p) for p in paths])] == sorted(kept)


@pytest.mark.parametrize("path", ["/", "/var", "/etc"])
def test_a_checkout_that_contains_a_bound_folder_is_refused_with_the_fix(path):
    with pytest.raises(AlbertError, match="folder of its own"):
        kept_paths([Path(path)])


def test_known_hosts_line_drops_the_comment():
    assert known_hosts_line("10.210.3.2", "ssh-ed25519 AAAAC3Nza root@h3\n") == (
        "10.210.3.2 ssh-ed25519 AAAAC3Nza\n")


def test_state_root_under_tmp_is_refused():
    with pytest.raises(AlbertError, match="under /tmp or /run"):
        NamespaceHost("x", 200, state_root=Path("/tmp/hosts"))


# --- real hosts ------------------------------------------------------------------------------


def _ssh(host, environ, argv, user="gitlab"):
    return subprocess.run(
        ["ssh", "-i", environ["SSH_PRIVATE_KEY"], "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={environ['SSH_KNOWN_HOSTS']}", "-o", "BatchMode=yes",
         f"{user}@{host.address}", argv],
        capture_output=True, text=True, timeout=60)


def test_two_hosts_never_see_each_others_containers(make_host, host_environment):
    a, b = make_host(docker=True), make_host(docker=True)
    host_environment([a, b])
    environ = {k: os.environ[k] for k in ("SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS")}
    for host in (a, b):
        busybox_image(host)
    started = _ssh(a, environ, "docker run -d --name only-on-a albert-busybox:test sleep 300")
    assert started.returncode == 0, started.stderr
    on_a = _ssh(a, environ, "docker ps --format '{{.Names}}'")
    on_b = _ssh(b, environ, "docker ps -a --format '{{.Names}}'")
    assert on_a.stdout.split() == ["only-on-a"]
    assert on_b.returncode == 0 and on_b.stdout.split() == []
    # the machine reaches each daemon through its socket, too
    names = subprocess.run(b.docker_cmd("ps", "-aq"), capture_output=True, text=True, check=True)
    assert names.stdout.strip() == ""


def test_ssh_as_gitlab_with_checked_host_key_through_our_runner(make_host, host_environment):
    host = make_host(docker=False)
    spec = load_spec("test", host_environment([host]))
    runner = SSHRunner(spec.env.hosts[0], spec.env.ssh)
    try:
        out = runner.run(Cmd.of("sh", "-c", "id -un; hostname; . /etc/os-release; echo $VERSION_ID")).stdout
    finally:
        runner.close()
    assert out.split() == ["gitlab", host.name, "22.04"]
    as_root = _ssh(host, {k: os.environ[k] for k in ("SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS")},
                   "id -u", user="root")
    assert as_root.stdout.strip() == "0", as_root.stderr


def test_unknown_or_wrong_host_key_is_refused(make_host, host_environment, tmp_path, monkeypatch):
    a, b = make_host(docker=False), make_host(docker=False)
    spec = load_spec("test", host_environment([a]))
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    monkeypatch.setenv("SSH_KNOWN_HOSTS", str(empty))
    with pytest.raises(AlbertError, match="not in known_hosts"):
        SSHRunner(spec.env.hosts[0], spec.env.ssh).run(Cmd.of("true"))
    # b's key presented as a's: a man in the middle
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(b.known_hosts.replace(b.address, a.address))
    monkeypatch.setenv("SSH_KNOWN_HOSTS", str(wrong))
    with pytest.raises(AlbertError, match=a.name):
        SSHRunner(spec.env.hosts[0], spec.env.ssh).run(Cmd.of("true"))


def test_up_is_idempotent_and_repairs_a_dead_sshd(make_host):
    host = make_host(docker=True)
    assert host.up() == []
    sshd = int((host.state / "sshd.pid").read_text())
    os.kill(sshd, signal.SIGKILL)
    host._procs["sshd"].wait(timeout=5)
    assert not host.is_up()
    assert host.up() == ["sshd started"]
    assert host.is_up()


def test_a_checkout_under_tmp_is_seen_by_the_host_read_only(make_host):
    """The host binds its own /tmp; a machine folder under /tmp it is handed stays visible."""
    folder = Path(tempfile.mkdtemp(prefix="albert-checkout-", dir="/tmp"))
    try:
        (folder / "init.sh").write_text("echo from-the-checkout\n")
        host = make_host(docker=False, visible=[folder])
        assert host.run(["bash", str(folder / "init.sh")]).stdout == "from-the-checkout\n"
        wiped = host.run(["sh", "-c", f"rm -rf {folder}/*; touch {folder}/x"], check=False)
        assert wiped.returncode != 0 and "Read-only" in wiped.stderr
        assert (folder / "init.sh").exists() and not (folder / "x").exists()
        # the host's own /tmp is still its own
        host.run(["touch", "/tmp/only-in-host"])
        assert not Path("/tmp/only-in-host").exists()
        make_host.release(host)
        assert (folder / "init.sh").exists()  # teardown never reaches into it
    finally:
        shutil.rmtree(folder)


def test_down_leaves_no_namespace_veth_process_or_state(make_host):
    host = make_host(docker=True)
    busybox_image(host)
    subprocess.run(host.docker_cmd("run", "-d", "albert-busybox:test", "sleep", "300"), check=True,
                   capture_output=True)
    netns_inode = os.stat(f"/run/netns/{host.netns}").st_ino
    mnt_inode = os.stat(host.ns_dir / "mnt").st_ino
    pids = [int((host.state / f"{d}.pid").read_text()) for d in ("sshd", "dockerd")]
    inside = pids_in_namespaces({netns_inode, mnt_inode})
    assert set(pids) <= set(inside) and len(inside) > 3  # containerd, shim, sleep too
    make_host.release(host)
    assert not Path(f"/run/netns/{host.netns}").exists()
    assert not Path(f"/sys/class/net/albh{host.index}").exists()
    assert not any(pid_alive(p) for p in inside)
    assert pids_in_namespaces({netns_inode, mnt_inode}) == []
    assert not host.state.exists()
    assert host.down() == []  # always safe


def test_cleanup_stale_removes_hosts_of_a_dead_session():
    dead = subprocess.Popen(["true"])
    dead.wait()
    index = claim_index(DEFAULT_ROOT)
    host = NamespaceHost(f"t{index}", index, docker=False, owner_pid=dead.pid)
    try:
        host.up()
        assert cleanup_stale(DEFAULT_ROOT) == [host.name]
        assert not Path(f"/run/netns/{host.netns}").exists()
        assert not host.state.exists()
    finally:
        host.down(purge=True)


def test_cli_up_status_down(capsys):
    index = claim_index(DEFAULT_ROOT)
    args = ["--name", "cli-host", "--index", str(index)]
    try:
        assert main(["testhost", "up", *args]) == 0
        out = capsys.readouterr().out
        assert f"export SSH_KNOWN_HOSTS={DEFAULT_ROOT}/h{index}/known_hosts" in out
        assert "export SSH_PRIVATE_KEY=" in out
        assert main(["testhost", "up", *args]) == 0
        assert "already up, no change" in capsys.readouterr().out
        assert main(["testhost", "status", *args]) == 0
        assert "sshd=up" in capsys.readouterr().out
        assert main(["testhost", "down", "--purge", *args]) == 0
        assert main(["testhost", "status", *args]) == 1
    finally:
        NamespaceHost("cli-host", index).down(purge=True)


def test_environment_toml_puts_extra_tables_after_hosts():
    class H:
        name, address = "h1", "10.210.1.2"

    text = environment_toml([H()], extra='runtime = "docker"\n[deploy]\nbase_dir = "/x"')
    assert text.index('runtime = "docker"') < text.index("[[hosts]]") < text.index("[deploy]")


def test_load_image_from_a_saved_tar(make_host, tmp_path):
    a, b = make_host(docker=True), make_host(docker=True)
    busybox_image(a)
    tar = tmp_path / "busybox.tar"
    subprocess.run(a.docker_cmd("save", "-o", str(tar), "albert-busybox:test"), check=True)
    b.load_image(tar)
    out = subprocess.run(b.docker_cmd("run", "--rm", "albert-busybox:test", "echo", "hi"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hi"
    with pytest.raises(AlbertError, match="no dockerd"):
        NamespaceHost("x", 250, docker=False).load_image(tar)
