"""``fab provision`` and utils/init_vm.sh on namespace hosts, over real SSH.

apt packages are machine-wide here and already present (scripts/bootstrap); the user, password,
authorized_keys, sudoers file, storage dir, idempotence and missing-variable paths run for real;
the NVIDIA branch runs as a dry plan.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from pyalbert.commands.provision import INIT_VM

REPO = Path(__file__).resolve().parents[2]
FAB = str(REPO / ".venv" / "bin" / "fab")


def fab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FAB, "-r", str(REPO / "deploy"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.fixture
def deploy_key(monkeypatch):
    """The deploy user's secrets; the public key is the test client's, so SSH as the user works."""
    from pyalbert.devtools.testhosts import ensure_client_key

    pub = ensure_client_key().with_suffix(".pub").read_text().strip()
    password = "pw-" + secrets.token_hex(8) + " with 'quotes' $HOME"
    monkeypatch.setenv("GITLAB_PASSWORD", password)
    monkeypatch.setenv("GITLAB_SSH_PUBLIC_KEY", pub)
    return password


@pytest.fixture
def fresh(make_host, host_environment, deploy_key):
    host = make_host(docker=False)
    config = host_environment([host], extra='storage_dir = "/data/models"')
    yield host, config
    make_host.release(host)


def ssh(host, user: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", os.environ["SSH_PRIVATE_KEY"], "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={os.environ['SSH_KNOWN_HOSTS']}", "-o", "BatchMode=yes",
         f"{user}@{host.address}", command], capture_output=True, text=True, timeout=60)


def test_first_run_converges_then_second_run_changes_nothing(fresh, deploy_key):
    host, config = fresh
    first = fab("provision", "--env", "test", "--config-dir", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"[{host.name}] changed: /etc/sudoers.d/albert-gitlab" in first.stdout
    assert f"[{host.name}] changed: storage dir /data/models created" in first.stdout
    assert f"[{host.name}] changed: /home/gitlab/.ssh/authorized_keys: managed key" in first.stdout
    assert deploy_key not in first.stdout + first.stderr

    second = fab("provision", "--env", "test", "--config-dir", str(config))
    assert second.returncode == 0, second.stderr
    assert "changed:" not in second.stdout
    assert f"✓ {host.name} no change" in second.stdout

    mode = host.run(["stat", "-c", "%U %a", "/etc/sudoers.d/albert-gitlab"]).stdout.strip()
    assert mode == "root 440"
    assert host.run(["visudo", "-cf", "/etc/sudoers.d/albert-gitlab"], check=False).returncode == 0
    assert host.run(["stat", "-c", "%U", "/data/models"]).stdout.strip() == "gitlab"
    # the sudo rules are narrow: the storage dir yes, anything else no
    assert ssh(host, "gitlab", "sudo -n /usr/bin/mkdir -p /data/models").returncode == 0
    refused = ssh(host, "gitlab", "sudo -n cat /etc/shadow")
    assert refused.returncode != 0 and "password is required" in refused.stderr
    # the test client's key, outside the managed block, is kept
    keys = host.run(["cat", "/home/gitlab/.ssh/authorized_keys"]).stdout
    assert keys.count("# BEGIN albert managed keys") == 1


def test_creates_a_new_user_with_hashed_password_key_and_docker_group(fresh, deploy_key):
    host, config = fresh
    user = "alb" + secrets.token_hex(3)
    try:
        out = fab("provision", "--env", "test", "--config-dir", str(config), "--user", user)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"changed: user {user} created" in out.stdout
        groups = host.run(["id", "-nG", user]).stdout.split()
        assert "docker" in groups
        shadow = host.run(["getent", "shadow", user]).stdout.split(":")[1]
        salt = shadow.split("$")[2]
        again = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                               input=deploy_key, capture_output=True, text=True).stdout.strip()
        assert shadow.startswith("$6$") and again == shadow
        assert ssh(host, user, "id -un").stdout.strip() == user
        # a new password is applied (and only then)
        changed = fab("provision", "--env", "test", "--config-dir", str(config), "--user", user,
                      env={"GITLAB_PASSWORD": "another one"})
        assert f"changed: password of {user} set" in changed.stdout
        assert "init_vm" not in changed.stderr
    finally:
        subprocess.run(["userdel", "-r", user], capture_output=True)
        Path(f"/var/mail/{user}").unlink(missing_ok=True)


def test_missing_variables_fail_before_any_change(fresh, monkeypatch):
    host, config = fresh
    monkeypatch.delenv("GITLAB_PASSWORD")
    out = fab("provision", "--env", "test", "--config-dir", str(config))
    assert out.returncode != 0
    assert "GITLAB_PASSWORD" in out.stderr and "no host was touched" in out.stderr
    # the script itself refuses too, before any change, naming both variables
    direct = host.run(["bash", str(INIT_VM), "--user", "gitlab", "--storage-dir", "/data/models"],
                      check=False)
    assert direct.returncode == 2
    assert "missing GITLAB_PASSWORD GITLAB_SSH_PUBLIC_KEY" in direct.stderr
    assert host.run(["test", "-e", "/etc/sudoers.d/albert-gitlab"], check=False).returncode == 1
    assert host.run(["test", "-e", "/data/models"], check=False).returncode == 1


def test_dry_run_plans_the_gpu_stack_and_changes_nothing(fresh, deploy_key):
    host, config = fresh
    out = fab("provision", "--env", "test", "--config-dir", str(config), "--dry-run", "--gpu", "yes")
    assert out.returncode == 0, out.stdout + out.stderr
    would = [line.split("would change: ", 1)[1] for line in out.stdout.splitlines()
             if "would change: " in line]
    assert "apt install nvidia-driver-535 nvidia-cuda-toolkit nvidia-container-toolkit" in would
    assert "docker nvidia runtime (/etc/docker/daemon.json)" in would
    assert any(w.startswith("apt source for nvidia-container-toolkit") for w in would)
    assert "/etc/sudoers.d/albert-gitlab: sudo rules for gitlab (validated)" in would
    assert "would be made" in out.stdout
    assert host.run(["test", "-e", "/etc/sudoers.d/albert-gitlab"], check=False).returncode == 1
    assert host.run(["test", "-e", "/data/models"], check=False).returncode == 1
    # without a GPU and without --gpu, nothing NVIDIA is planned
    auto = fab("provision", "--env", "test", "--config-dir", str(config), "--dry-run")
    assert "nvidia" not in auto.stdout


def test_hosts_are_provisioned_in_parallel_with_one_summary_line_each(make_host, host_environment,
                                                                       deploy_key):
    a, b = make_host(docker=False), make_host(docker=False)
    config = host_environment([a, b], extra='storage_dir = "/data/models"')
    try:
        out = fab("provision", "--env", "test", "--config-dir", str(config))
        assert out.returncode == 0, out.stdout + out.stderr
        for host in (a, b):  # (the password is machine-wide: whichever host runs first sets it)
            assert f"[{host.name}] changed: /etc/sudoers.d/albert-gitlab" in out.stdout
            assert re.search(rf"✓ {host.name} [34] change\(s\)", out.stdout)
        # an unreachable host fails alone, by name; the other still reports
        b.down()
        again = fab("provision", "--env", "test", "--config-dir", str(config))
        assert again.returncode != 0
        assert f"✓ {a.name} no change" in again.stdout
        assert f"✗ {b.name} provision failed" in again.stdout
        assert f"host {b.name} (root@{b.address}:22)" in again.stdout
    finally:
        make_host.release(a)
        make_host.release(b)
