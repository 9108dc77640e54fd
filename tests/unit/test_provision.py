"""Builders and parsers of provisioning: whole strings, secrets masked, clear errors."""

from __future__ import annotations

import subprocess

import pytest

from pyalbert.commands.base import Secret
from pyalbert.commands.provision import (
    INIT_VM,
    ProvisionSecrets,
    init_vm,
    parse_init_vm,
    provision_secrets,
)
from pyalbert.errors import AlbertError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEy4 deploy@ci"
SECRETS = ProvisionSecrets(Secret("p@ss 'w0rd' $HOME"), KEY)


def test_init_vm_as_root_golden():
    cmd = init_vm("echo script\n", SECRETS, user="gitlab", storage_dir="/data/models")
    assert cmd.render() == "bash -s -- --user gitlab --storage-dir /data/models"
    assert cmd.stdin_text == (
        "GITLAB_PASSWORD='p@ss '\"'\"'w0rd'\"'\"' $HOME'\n"
        "GITLAB_SSH_PUBLIC_KEY='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEy4 deploy@ci'\n"
        "echo script\n"
    )


def test_init_vm_with_sudo_gpu_and_dry_run_golden_and_masked():
    cmd = init_vm("x\n", SECRETS, user="ops", storage_dir="/srv/m", gpu="yes", dry_run=True,
                  as_root=False)
    assert cmd.render() == "sudo -n bash -s -- --user ops --storage-dir /srv/m --gpu --dry-run"
    shown = cmd.display()
    assert shown.startswith("sudo -n bash -s -- --user ops --storage-dir /srv/m --gpu --dry-run <<< [secret, ")
    assert "w0rd" not in shown and "w0rd" not in repr(cmd.stdin)


@pytest.mark.parametrize(("gpu", "flag"), [("auto", None), ("yes", "--gpu"), ("no", "--no-gpu")],
                         ids=["auto-detects", "forced-on", "forced-off"])
def test_gpu_flag(gpu, flag):
    tokens = init_vm("", SECRETS, gpu=gpu).tokens
    assert [t for t in tokens if str(t).startswith(("--gpu", "--no-gpu"))] == ([flag] if flag else [])


def test_the_header_really_sets_the_secrets_in_bash():
    cmd = init_vm('printf "%s|%s" "$GITLAB_PASSWORD" "$GITLAB_SSH_PUBLIC_KEY"\n', SECRETS)
    out = subprocess.run(["bash", "-s"], input=cmd.stdin_text, capture_output=True, text=True)
    assert out.stdout == f"p@ss 'w0rd' $HOME|{KEY}"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "GITLAB_PASSWORD and GITLAB_SSH_PUBLIC_KEY"),
        ({"GITLAB_SSH_PUBLIC_KEY": KEY}, "needs GITLAB_PASSWORD in"),
        ({"GITLAB_PASSWORD": "x"}, "needs GITLAB_SSH_PUBLIC_KEY in"),
        ({"GITLAB_PASSWORD": "x", "GITLAB_SSH_PUBLIC_KEY": "not a key"}, "not one OpenSSH public key"),
        ({"GITLAB_PASSWORD": "x", "GITLAB_SSH_PUBLIC_KEY": KEY + "\n" + KEY}, "not one OpenSSH"),
    ],
    ids=["both-missing", "password-missing", "key-missing", "key-garbage", "two-keys"],
)
def test_bad_secrets_fail_naming_the_variable(environ, message):
    with pytest.raises(AlbertError, match=message):
        provision_secrets(environ)


def test_public_key_from_a_file_variable(tmp_path):
    path = tmp_path / "id.pub"
    path.write_text(KEY + "\n")
    got = provision_secrets({"GITLAB_PASSWORD": "x", "GITLAB_SSH_PUBLIC_KEY": str(path)})
    assert got.public_key == KEY and got.password.value == "x"


def test_parse_report():
    out = (
        "note: no systemd: services docker and fail2ban not managed\n"
        "changed: user gitlab created\n"
        "changed: storage dir /data/models created\n"
        "init_vm: 2 change(s)\n"
    )
    report = parse_init_vm(out)
    assert report.changed == ["user gitlab created", "storage dir /data/models created"]
    assert report.notes == ["no systemd: services docker and fail2ban not managed"]
    assert report.summary() == "2 change(s)"
    assert parse_init_vm("init_vm: no change\n").summary() == "no change"
    assert parse_init_vm("would change: apt install jq\n").summary() == "1 change(s) would be made"


def test_init_vm_script_is_valid_bash_and_refuses_before_any_change():
    assert subprocess.run(["bash", "-n", str(INIT_VM)]).returncode == 0
    out = subprocess.run(["bash", str(INIT_VM), "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown option '--bogus'" in out.stderr
