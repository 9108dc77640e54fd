"""``fab status`` of a host group's cluster: the node units' health and a line per Ray node, from
``ray status -v`` output captured on two namespace hosts (Ray 2.60)."""

from __future__ import annotations

from pathlib import Path

from pyalbert.config.environment import HostSpec
from pyalbert.config.groups import RayGroup
from pyalbert.config.ray_ports import RayPortsSpec
from pyalbert.engine.ray_status import judge

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ray"
GROUP = RayGroup(env="test", name="ab", model_id="m", ports=RayPortsSpec(),
                 hosts=(HostSpec(name="a", address="10.0.0.1"), HostSpec(name="b", address="10.0.0.2")))


def test_both_nodes_listed_with_their_resources():
    health, lines = judge(GROUP, (FIXTURES / "status-2.60-two-nodes-verbose.txt").read_text())
    assert health == "ok"
    assert lines == ["ray ab node 3d0eeae442fc active: CPU 0/1, memory 0.0/15.7 GiB",
                     "ray ab node 8c2846da83f8 active: CPU 0/2, memory 0.0/15.6 GiB"]


def test_a_missing_node_is_counted():
    health, lines = judge(GROUP, (FIXTURES / "status-2.60-one-node.txt").read_text())
    assert health == "1 of 2 nodes" and len(lines) == 1


def test_no_answer_and_a_starting_head():
    assert judge(GROUP, "") == ("no ray status", [])
    assert judge(GROUP, "No cluster status. It may take a few seconds...") == ("starting", [])
