"""The Ray firewall of a host group (issue 17): rules rendered from the config, applied whole and
atomically, and a re-run that finds them in place changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from pyalbert.commands import firewall
from pyalbert.config import load_spec
from pyalbert.engine.provision import ray_firewall

ENV = """
placement = { "llama" = { group = "ab" } }

[groups.ab]
hosts = ["gpu-a", "gpu-b", "gpu-c"]

[[hosts]]
name = "gpu-a"
address = "10.0.0.1"
private_address = "10.1.0.1"

[[hosts]]
name = "gpu-b"
address = "10.0.0.2"
private_address = "10.1.0.2"
services = ["vllm"]

[[hosts]]
name = "gpu-c"
address = "10.0.0.3"
services = ["vllm"]

[[hosts]]
name = "web"
address = "10.0.0.9"
services = ["api"]
"""


@pytest.fixture
def placement(config_factory):
    config_factory.env(ENV)
    config_factory.routing({"llama": {"model": "meta/llama", "port": 8001,
                                      "pipeline_parallel_size": 3}})
    return load_spec("test", config_factory.root).placement


def host(placement, name):
    return placement.spec.env.host(name)


def test_the_head_opens_its_ray_ports_to_the_other_hosts_of_the_group_only(placement):
    [(name, rules)] = ray_firewall(placement, host(placement, "gpu-a"))
    ports = "6379,8076,8077,8078,8079,8085,52365,10002:10100"
    assert name == "ALBERT-RAY-ab"
    assert rules == [
        "-A ALBERT-RAY-ab -i lo -j RETURN",
        f"-A ALBERT-RAY-ab -s 10.1.0.2/32 -p tcp -m multiport --dports {ports} -j ACCEPT",
        f"-A ALBERT-RAY-ab -s 10.0.0.3/32 -p tcp -m multiport --dports {ports} -j ACCEPT",
        f"-A ALBERT-RAY-ab -p tcp -m multiport --dports {ports},10001,8265 -j DROP",
    ]


def test_a_worker_has_no_gcs_port_and_hosts_outside_groups_no_rule(placement):
    [(_, rules)] = ray_firewall(placement, host(placement, "gpu-b"))
    assert "6379" not in "".join(rules)
    assert [r.split(" -p ")[0] for r in rules[1:3]] == ["-A ALBERT-RAY-ab -s 10.1.0.1/32",
                                                        "-A ALBERT-RAY-ab -s 10.0.0.3/32"]
    assert ray_firewall(placement, host(placement, "web")) == []


def test_ensure_is_one_atomic_restore_and_an_idempotent_jump():
    cmd = firewall.ensure("ALBERT-RAY-ab", ["-A ALBERT-RAY-ab -i lo -j RETURN"])
    assert cmd.render() == (
        "sh -c 'printf %s \"$1\" | iptables-restore --noflush && { iptables -C INPUT -j \"$2\" "
        "2>/dev/null || iptables -I INPUT 1 -j \"$2\"; }' ensure_firewall '*filter\n"
        ":ALBERT-RAY-ab - [0:0]\n-A ALBERT-RAY-ab -i lo -j RETURN\nCOMMIT\n' ALBERT-RAY-ab")


def test_is_current_reads_iptables_s():
    wanted = ["-A X -i lo -j RETURN"]
    assert firewall.is_current("-N X\n-A X -i lo -j RETURN\n", wanted)
    assert not firewall.is_current("", wanted)
    assert not firewall.is_current("-N X\n-A X -i lo -j RETURN\n-A X -j DROP\n", wanted)


def test_too_many_ports_for_one_rule_is_refused():
    with pytest.raises(ValueError, match="more than 15 ports"):
        firewall.rules("X", ["10.0.0.1"], list(range(1024, 1040)))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables-restore"),
                    reason="needs root and iptables (a network namespace of its own)")
def test_rules_land_in_a_real_iptables_and_a_rerun_finds_them(placement):
    """In a network namespace this test creates: the rules as applied are the rules as rendered
    (so the probe's comparison holds), and a second ensure adds no second INPUT jump."""
    ns = f"albert-fw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def run(cmd) -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", cmd.render()],
                                  check=True, capture_output=True, text=True).stdout
        [(name, rules)] = ray_firewall(placement, host(placement, "gpu-a"))
        assert not firewall.is_current(run(firewall.show(name)), rules)
        run(firewall.ensure(name, rules))
        assert firewall.is_current(run(firewall.show(name)), rules)
        run(firewall.ensure(name, rules))
        jumps = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-S", "INPUT"],
                               check=True, capture_output=True, text=True).stdout
        assert jumps.count(f"-j {name}") == 1
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
