"""Deploy benchmark: a 2-model environment (fake vLLM image) to 1 host vs 4 namespace hosts.

    sudo .venv/bin/python bench/deploy.py

Prints first deploy and no-op redeploy times side by side with their ratios. Targets (issue 9):
4 hosts <= 1.5x the time of 1 host; no-op redeploy <= 3 s for 4 hosts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyalbert.config import load_spec  # noqa: E402
from pyalbert.engine.operations import deploy_env, down_env  # noqa: E402
from tests.support.fake_vllm.image import ensure_fake_vllm_image  # noqa: E402
from tests.support.hosts import HostFactory, environment_toml, ssh_environ  # noqa: E402

STORAGE = Path("/var/tmp/albert-bench/models")


def write_env(root: Path, hosts, image: str, name: str) -> None:
    (root / "environments").mkdir(parents=True, exist_ok=True)
    models = {"bench-a": {"model": "org/a", "port": 18501, "env": {"FAKE_VLLM_START_DELAY": "1"}},
              "bench-b": {"model": "org/b", "port": 18502, "env": {"FAKE_VLLM_START_DELAY": "1"}}}
    for model_id in models:
        (STORAGE / model_id).mkdir(parents=True, exist_ok=True)
    (root / "llm_routing_table.json").write_text(json.dumps(models))
    # every host runs both models and the api (replicas = number of hosts)
    for spec in models.values():
        spec["replicas"] = len(hosts)
    (root / "llm_routing_table.json").write_text(json.dumps(models))
    (root / "environments" / f"{name}.toml").write_text(environment_toml(hosts, f"""
storage_dir = "{STORAGE}"
[images]
vllm = "{image}"
api = "{image}"
[api]
port = 18580
[deploy]
ready_timeout_s = 60
base_dir = "/home/gitlab/albert-bench"
"""))


def measure(hosts, image: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="albert-bench-") as tmp:
        root = Path(tmp) / "config"
        name = f"bench{len(hosts)}"
        write_env(root, hosts, image, name)
        os.environ.update(ssh_environ(hosts, Path(tmp)))
        spec = load_spec(name, root)
        try:
            t0 = time.monotonic()
            deploy_env(spec, quiet=True)
            first = time.monotonic() - t0
            t0 = time.monotonic()
            results = deploy_env(spec, quiet=True)
            noop = time.monotonic() - t0
            assert all(r.status == "unchanged" for r in results), results
        finally:
            down_env(spec)
    return first, noop


def main() -> None:
    image = ensure_fake_vllm_image()
    factory = HostFactory()
    try:
        hosts = [factory(docker=True) for _ in range(4)]
        for h in hosts:
            h.load_image(image)
        one = measure(hosts[:1], image)
        four = measure(hosts, image)
    finally:
        factory.close()
    print(f"{'':24}{'1 host':>10}{'4 hosts':>10}{'4/1':>8}")
    print(f"{'first deploy (s)':24}{one[0]:10.2f}{four[0]:10.2f}{four[0] / one[0]:8.2f}"
          "   target 4/1 <= 1.5")
    print(f"{'no-op redeploy (s)':24}{one[1]:10.2f}{four[1]:10.2f}{four[1] / one[1]:8.2f}"
          "   target 4 hosts <= 3 s")
    print(f"{'no-op / first':24}{one[1] / one[0]:10.2f}{four[1] / four[0]:10.2f}")


if __name__ == "__main__":
    main()
