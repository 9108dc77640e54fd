"""``fab provision`` and utils/init_vm.sh on namespace hosts, over real SSH.

apt packages are machine-wide here and already present (scripts/bootstrap); the user, password,
authorized_keys, sudo rules (none), storage dir, idempotence and missing-variable paths run for
real; the NVIDIA branch runs as a dry plan. The deploy user's home is the attacker's ground:
symlinks planted there must not lead root's writes, reads or chowns anywhere.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
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
    assert "sudoers" not in first.stdout
    assert f"[{host.name}] changed: storage dir /data/models created" in first.stdout
    assert f"[{host.name}] changed: /home/gitlab/.ssh/authorized_keys: managed key" in first.stdout
    assert deploy_key not in first.stdout + first.stderr

    second = fab("provision", "--env", "test", "--config-dir", str(config))
    assert second.returncode == 0, second.stderr
    assert "changed:" not in second.stdout
    assert f"✓ {host.name} no change" in second.stdout

    assert host.run(["test", "-e", "/etc/sudoers.d/albert-gitlab"], check=False).returncode == 1
    assert host.run(["stat", "-c", "%U", "/data/models"]).stdout.strip() == "gitlab"
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
    assert not any("sudoers" in w for w in would)
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
            assert f"[{host.name}] changed: storage dir /data/models created" in out.stdout
            assert re.search(rf"✓ {host.name} [23] change\(s\)", out.stdout)
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


# --- sudo: only the rules the code uses (none) ------------------------------------------------
#: what utils/init_vm.sh installed before: rules nothing calls, `status` (a pager as root) and
#: nvidia-smi with any arguments
OLD_SUDOERS = """\
# Managed by Albert Deploy (utils/init_vm.sh): changes are overwritten.
Cmnd_Alias ALBERT_UNITS = /usr/bin/systemctl start albert-*, /usr/bin/systemctl stop albert-*, \\
  /usr/bin/systemctl restart albert-*, /usr/bin/systemctl status albert-*, /usr/bin/systemctl daemon-reload
Cmnd_Alias ALBERT_STORAGE = /usr/bin/mkdir -p /data/models, /usr/bin/chown gitlab\\:gitlab /data/models
Cmnd_Alias ALBERT_GPU = /usr/bin/nvidia-smi
gitlab ALL=(root) NOPASSWD: ALBERT_UNITS, ALBERT_STORAGE, ALBERT_GPU
"""
UNUSED_AS_ROOT = [
    "sudo -n /usr/bin/systemctl status albert-x",
    "sudo -n /usr/bin/systemctl status albert-x --no-pager -o cat",
    "sudo -n /usr/bin/nvidia-smi -pm 0",
    "sudo -n /usr/bin/systemctl daemon-reload",
    "sudo -n /usr/bin/mkdir -p /data/models",
]


@pytest.mark.parametrize("before", ["fresh", "old-rules"])
def test_the_deploy_user_gets_no_sudo_rule_nothing_uses(fresh, deploy_key, before):
    host, config = fresh
    if before == "old-rules":  # a host provisioned by the previous init_vm.sh
        host.run("umask 337 && cat > /etc/sudoers.d/albert-gitlab", input=OLD_SUDOERS)
        assert ssh(host, "gitlab", UNUSED_AS_ROOT[0]).stderr.count("password is required") == 0

    out = fab("provision", "--env", "test", "--config-dir", str(config))

    assert out.returncode == 0, out.stdout + out.stderr
    assert host.run(["test", "-e", "/etc/sudoers.d/albert-gitlab"], check=False).returncode == 1
    if before == "old-rules":
        assert (f"[{host.name}] changed: /etc/sudoers.d/albert-gitlab removed (sudo rules nothing "
                "uses)") in out.stdout
    for command in UNUSED_AS_ROOT:
        refused = ssh(host, "gitlab", command)
        assert refused.returncode != 0 and "password is required" in refused.stderr, command
    again = fab("provision", "--env", "test", "--config-dir", str(config))
    assert "changed:" not in again.stdout


def test_a_sudoers_file_albert_did_not_write_is_left_alone(fresh):
    host, _ = fresh
    own = "# the admins' own rule\ngitlab ALL=(root) NOPASSWD: /usr/bin/true\n"
    host.run("umask 337 && cat > /etc/sudoers.d/albert-gitlab", input=own)
    out = run_init_vm(host, KEY_A)
    assert out.returncode == 0, out.stdout + out.stderr
    assert host.run(["cat", "/etc/sudoers.d/albert-gitlab"]).stdout == own
    assert "note: /etc/sudoers.d/albert-gitlab: not written by Albert Deploy: left alone" in out.stdout


# --- symlinks planted in the deploy user's home ------------------------------------------------
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlbertTestKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAA first"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlbertTestKeyBBBBBBBBBBBBBBBBBBBBBBBBBBBB second"
SECRET = "root only: not for the deploy user\n"


def run_init_vm(host, key: str) -> subprocess.CompletedProcess:
    """init_vm.sh as root on the host, secrets in a 0600 env file (the host's private /tmp)."""
    host.run("umask 077 && cat > /tmp/init-vm.env", input=f"GITLAB_PASSWORD=pw-symlink-test\n"
                                                         f"GITLAB_SSH_PUBLIC_KEY={key}\n")
    return host.run(["bash", str(INIT_VM), "--env-file", "/tmp/init-vm.env", "--skip-packages",
                     "--no-gpu", "--user", "gitlab", "--storage-dir", "/data/models"], check=False)


def as_gitlab(host, command: str) -> None:
    """What the deploy user (or whoever holds its account) can do: no root."""
    host.run(["setpriv", "--reuid=gitlab", "--regid=gitlab", "--init-groups", "sh", "-c", command])


@pytest.fixture
def provisioned(make_host):
    host = make_host(docker=False)
    first = run_init_vm(host, KEY_A)
    assert first.returncode == 0, first.stdout + first.stderr
    # root's files the deploy user must never reach
    host.run(f"install -d -m 0700 /data/root-dir && umask 077 && printf %s {shlex.quote(SECRET)} "
             "> /data/root-file && cp /data/root-file /data/root-dir/authorized_keys")
    yield host
    make_host.release(host)


def root_files_untouched(host) -> None:
    assert host.run(["cat", "/data/root-file"]).stdout == SECRET
    assert host.run(["cat", "/data/root-dir/authorized_keys"]).stdout == SECRET
    assert host.run(["stat", "-c", "%U:%G %a", "/data/root-file", "/data/root-dir",
                     "/data/root-dir/authorized_keys"]).stdout.split("\n")[:3] == [
        "root:root 600", "root:root 700", "root:root 600"]


@pytest.mark.parametrize("plant", [
    "ln -s /data/root-file .ssh/authorized_keys.tmp",
    "ln -sfn /data/root-file .ssh/authorized_keys",
    "ln -sfn /data/root-dir/authorized_keys .ssh/authorized_keys",
], ids=["tmp-file-link", "keys-file-link", "keys-file-link-into-root-dir"])
def test_a_link_planted_in_ssh_dir_redirects_no_write_read_or_chown(provisioned, plant):
    host = provisioned
    as_gitlab(host, "cd /home/gitlab && " + plant)

    out = run_init_vm(host, KEY_B)  # a new key: authorized_keys is rewritten

    assert out.returncode == 0, out.stdout + out.stderr
    root_files_untouched(host)
    keys = host.run(["cat", "/home/gitlab/.ssh/authorized_keys"]).stdout
    assert KEY_B in keys and KEY_A not in keys and "root only" not in keys  # nothing leaked
    assert host.run(["stat", "-c", "%U:%G %a %F", "/home/gitlab/.ssh/authorized_keys"]).stdout.strip() \
        == "gitlab:gitlab 600 regular file"
    assert run_init_vm(host, KEY_B).stdout.strip().endswith("init_vm: no change")


def test_a_linked_ssh_dir_is_not_followed_as_root(provisioned):
    host = provisioned
    as_gitlab(host, "cd /home/gitlab && rm -rf .ssh && ln -s /data/root-dir .ssh")

    out = run_init_vm(host, KEY_B)

    assert out.returncode != 0
    assert "/home/gitlab/.ssh" in out.stderr and "gitlab" in out.stderr
    root_files_untouched(host)
