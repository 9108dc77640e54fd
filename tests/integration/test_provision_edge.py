"""``utils/init_vm.sh --edge-port 80`` on a namespace host (issue 16): the deploy user, who runs
HAProxy, may then bind the front door's redirect port (where ACME http-01 arrives); a second run
changes nothing. The host's ``/etc/sysctl.d`` is a tmpfs of its own (the machine's is shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyalbert.commands.provision import INIT_VM

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlbertTestKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAA edge"
FILE = "/etc/sysctl.d/60-albert-edge.conf"
BIND_80 = "import socket; socket.socket().bind(('127.0.0.1', 80)); print('bound')"


@pytest.fixture
def host(make_host):
    host = make_host(docker=False)
    host.run("mount -t tmpfs -o mode=0755 tmpfs /etc/sysctl.d && "
             "sysctl -q -w net.ipv4.ip_unprivileged_port_start=1024")
    yield host
    host.run("umount /etc/sysctl.d; sysctl -q -w net.ipv4.ip_unprivileged_port_start=1024", check=False)
    make_host.release(host)


def init_vm(host, *options: str):
    host.run("umask 077 && cat > /tmp/init-vm.env", input=f"GITLAB_PASSWORD=pw-edge\nGITLAB_SSH_PUBLIC_KEY={KEY}\n")
    return host.run(["bash", str(INIT_VM), "--env-file", "/tmp/init-vm.env", "--skip-packages", "--no-gpu",
                     "--user", "gitlab", "--storage-dir", "/data/models", *options], check=False)


def bind_as_deploy_user(host):
    return host.run(["setpriv", "--reuid=gitlab", "--regid=gitlab", "--init-groups", "python3", "-c", BIND_80],
                    check=False)


def test_deploy_user_may_bind_port_80_after_provisioning_and_a_rerun_changes_nothing(host):
    first = init_vm(host)  # the deploy user exists; no --edge-port: the range is left alone
    assert first.returncode == 0, first.stdout + first.stderr
    refused = bind_as_deploy_user(host)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    edge = init_vm(host, "--edge-port", "80")
    assert edge.returncode == 0, edge.stdout + edge.stderr
    assert f"changed: {FILE}: unprivileged ports from 80" in edge.stdout
    assert "changed: net.ipv4.ip_unprivileged_port_start = 80 (was 1024)" in edge.stdout
    assert host.run(["cat", FILE]).stdout.splitlines()[-1] == "net.ipv4.ip_unprivileged_port_start = 80"
    assert host.run(["stat", "-c", "%U %a", FILE]).stdout.split() == ["root", "644"]
    assert bind_as_deploy_user(host).stdout.strip() == "bound"
    again = init_vm(host, "--edge-port", "80")
    assert again.returncode == 0 and "init_vm: no change" in again.stdout, again.stdout
    assert not Path(FILE).exists(), "the host's sysctl.d leaked onto the machine"
