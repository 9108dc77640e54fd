"""link-gpu writes the lease as a node-exporter textfile (the data of the "GPU lease held past
its time" alert), unlink-gpu removes it; only where a node exporter runs; a folder the deploy
user cannot write is a note, never a failed link."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pyalbert.commands import gpu
from pyalbert.config import load_spec
from pyalbert.engine.context import RunContext
from pyalbert.engine.gpu_lease import link_gpu_env, unlink_gpu_env
from pyalbert.observability import promql as q
from pyalbert.remote import DryRunner, LocalRunner, Result

NOW = datetime(2026, 12, 1, 22, 0, tzinfo=timezone.utc)
CTX = RunContext(who="ci@runner", pipeline="4242")


class LeaseHost(DryRunner):
    """Records commands; holds the lease file in memory; runs the textfile commands for real."""

    def __init__(self, textfile_ok: bool = True):
        super().__init__("gpu-1")
        self.lease, self.textfile_ok = "", textfile_ok

    def run(self, cmd, *, check=True, timeout=None):
        self.commands.append(cmd)
        text = cmd.render()
        if "albert-gpu-lease.prom" in text:
            if not self.textfile_ok:
                return Result(cmd, 1, "", "mkdir: cannot create directory: Permission denied")
            return LocalRunner().run(cmd, check=check)
        if text == gpu.read("/srv/albert").render():
            return Result(cmd, 0, self.lease, "")
        if "nvidia-smi" in text:
            return Result(cmd, 1, "", "")
        return Result(cmd, 0, "", "")

    def close(self):
        pass


@pytest.fixture
def spec_of(config_factory, tmp_path):
    def make(metrics: str):
        config_factory.env('[deploy]\nbase_dir = "/srv/albert"\n[[hosts]]\nname = "gpu-1"\n'
                           'address = "10.0.0.1"\ngpus = 1\n[gpu_link]\nenabled = true\n' + metrics)
        config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
        return load_spec("test", config_factory.root)
    return make


def test_link_writes_the_lease_textfile_and_unlink_removes_it(spec_of, tmp_path):
    textfiles = tmp_path / "node-exporter"
    spec = spec_of(f"[metrics]\nenabled = true\nnode_exporter_port = 9100\ntextfile_dir = '{textfiles}'\n")
    host = LeaseHost()
    said = link_gpu_env(spec, lambda h: host, now=NOW, ctx=CTX)["gpu-1"]
    assert "lease taken for pipeline 4242" in said and "lease metric" not in said
    text = (textfiles / "albert-gpu-lease.prom").read_text()
    expires = datetime(2026, 12, 2, 1, 0, tzinfo=timezone.utc).timestamp()  # 180 minutes later
    assert f'{q.GPU_LEASE_EXPIRY}{{env="test",pipeline="4242",who="ci@runner"}} {expires:.0f}\n' in text
    host.lease = gpu.new_lease("test", "ci@runner", "4242", 180, NOW).to_json()
    unlink_gpu_env(spec, lambda h: host, now=NOW, ctx=CTX)
    assert not (textfiles / "albert-gpu-lease.prom").exists()


@pytest.mark.parametrize("metrics", ["", "[metrics]\nenabled = true\n",
                                     "[metrics]\nenabled = false\nnode_exporter_port = 9100\n"],
                         ids=["no-metrics", "no-node-exporter", "metrics-off"])
def test_no_textfile_without_a_node_exporter(spec_of, metrics):
    host = LeaseHost()
    link_gpu_env(spec_of(metrics), lambda h: host, now=NOW, ctx=CTX)
    unlink_gpu_env(spec_of(metrics), lambda h: host, now=NOW, ctx=CTX)
    assert not [c for c in host.commands if "albert-gpu-lease.prom" in c.render()]


def test_an_unwritable_textfile_folder_is_a_note_not_a_failed_link(spec_of):
    spec = spec_of("[metrics]\nenabled = true\nnode_exporter_port = 9100\n")
    said = link_gpu_env(spec, lambda h: LeaseHost(textfile_ok=False), now=NOW, ctx=CTX)["gpu-1"]
    assert "lease taken for pipeline 4242" in said
    assert ("the lease metric was not written to /var/lib/prometheus/node-exporter "
            "(mkdir: cannot create directory: Permission denied)") in said
