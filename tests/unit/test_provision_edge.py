"""Provisioning for the front door (issue 16): the deploy user runs HAProxy, so the host of the api
is provisioned to let it bind its port below 1024 (``--edge-port``, the lowest of ``[api] port``
and ``[edge] redirect_port``)."""

from __future__ import annotations

import subprocess

import pytest

from pyalbert.commands.base import Secret
from pyalbert.commands.provision import INIT_VM, ProvisionSecrets, edge_low_port, init_vm

SECRETS = ProvisionSecrets(Secret("pw"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEy4 deploy@ci")


@pytest.mark.parametrize("api_port, redirect_port, low", [
    (8443, None, None), (443, None, 443), (8443, 80, 80), (443, 80, 80), (8443, 8080, None),
], ids=["unprivileged", "api-443", "redirect-80", "both-low", "both-high"])
def test_edge_low_port(api_port, redirect_port, low):
    assert edge_low_port(api_port, redirect_port) == low


def test_init_vm_passes_the_edge_port_only_when_there_is_one():
    cmd = init_vm("x\n", SECRETS, user="gitlab", storage_dir="/data/models", edge_port=80)
    assert cmd.render() == "bash -s -- --user gitlab --storage-dir /data/models --edge-port 80"
    assert "--edge-port" not in init_vm("x\n", SECRETS, edge_port=None).render()


@pytest.mark.parametrize("value", ["abc", "0", "70000", "80x"])
def test_init_vm_refuses_a_bad_edge_port_before_any_change(value):
    env = {"GITLAB_PASSWORD": "pw", "GITLAB_SSH_PUBLIC_KEY": SECRETS.public_key, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", str(INIT_VM), "--edge-port", value, "--dry-run"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2 and "--edge-port must be a port number" in out.stderr, out.stderr
