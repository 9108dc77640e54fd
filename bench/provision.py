"""Benchmark: ``fab provision`` no-op on 1 host and on 4 namespace hosts (root, Linux).

    .venv/bin/python bench/provision.py [--runs 5]

Brings up 4 test hosts (indexes >= 100), provisions them once, then times no-op re-runs: the
whole ``fab provision`` command (process start included) and the in-process part
(``provision_hosts``: SSH + init_vm.sh). Targets: <= 1 s for 1 host, <= 1.5 s for 4 hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from pyalbert.config import load_spec  # noqa: E402
from pyalbert.provisioner import provision_hosts  # noqa: E402
from pyalbert.testhosts import (  # noqa: E402
    DEFAULT_ROOT,
    NamespaceHost,
    claim_index,
    cleanup_stale,
    ensure_client_key,
)
from tests.support.hosts import DEFAULT_ROUTING, environment_toml  # noqa: E402


def write_env(config: Path, name: str, hosts: list[NamespaceHost]) -> None:
    (config / "environments").mkdir(parents=True, exist_ok=True)
    (config / "environments" / f"{name}.toml").write_text(
        environment_toml(hosts, 'storage_dir = "/data/models"'))
    (config / "llm_routing_table.json").write_text(json.dumps(DEFAULT_ROUTING))


def timed_fab(config: Path, env: str, environ: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv/bin/fab"), "-r", str(REPO / "deploy"), "provision",
                          "--env", env, "--config-dir", str(config)],
                         capture_output=True, text=True, env=environ, timeout=300)
    took = time.perf_counter() - start
    if out.returncode != 0 or "changed:" in out.stdout:
        raise SystemExit(f"not a no-op:\n{out.stdout}\n{out.stderr}")
    return took


def timed_inprocess(config: Path, env: str, environ: dict) -> float:
    spec = load_spec(env, config)
    start = time.perf_counter()
    outcomes = provision_hosts(spec, environ=environ)
    took = time.perf_counter() - start
    if any(o.error or o.value.count for o in outcomes):
        raise SystemExit(f"not a no-op: {outcomes}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cleanup_stale(DEFAULT_ROOT)
    key = ensure_client_key()
    hosts = []
    config = Path(f"/var/tmp/albert-bench-provision-{os.getpid()}")
    try:
        for _ in range(4):
            index = claim_index(DEFAULT_ROOT)
            host = NamespaceHost(f"t{index}", index, owner_pid=os.getpid())
            hosts.append(host)
            host.up()
        write_env(config, "one", hosts[:1])
        write_env(config, "four", hosts)
        known = config / "known_hosts"
        known.write_text("".join(h.known_hosts for h in hosts))
        environ = {**os.environ, "SSH_PRIVATE_KEY": str(key), "SSH_KNOWN_HOSTS": str(known),
                   "GITLAB_PASSWORD": "bench-password",
                   "GITLAB_SSH_PUBLIC_KEY": key.with_suffix(".pub").read_text().strip()}
        os.environ.update({k: environ[k] for k in ("SSH_PRIVATE_KEY", "SSH_KNOWN_HOSTS")})
        first = time.perf_counter()
        timed_inprocess_first = provision_hosts(load_spec("four", config), environ=environ)
        first = time.perf_counter() - first
        if any(o.error for o in timed_inprocess_first):
            raise SystemExit(f"first provision failed: {timed_inprocess_first}")
        rows = {}
        for env in ("one", "four"):
            rows[env] = (
                statistics.median(timed_fab(config, env, environ) for _ in range(args.runs)),
                statistics.median(timed_inprocess(config, env, environ) for _ in range(args.runs)),
            )
    finally:
        for host in hosts:
            host.down(purge=True)
        subprocess.run(["rm", "-rf", str(config)])
    load = os.getloadavg()[0]
    print(f"fab provision, no-op re-run (median of {args.runs}; load average {load:.1f} on "
          f"{os.cpu_count()} cores); first run on 4 hosts: {first:.2f} s")
    print(f"{'':24}{'1 host':>10}{'4 hosts':>10}{'4/1':>8}{'target':>16}")
    (f1, i1), (f4, i4) = rows["one"], rows["four"]
    print(f"{'fab provision (process)':24}{f1:>9.2f}s{f4:>9.2f}s{f4 / f1:>8.2f}{'1 s / 1.5 s':>16}")
    print(f"{'in-process (ssh+script)':24}{i1:>9.2f}s{i4:>9.2f}s{i4 / i1:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
