"""Benchmark: ``fab provision`` no-op on 1 host and on 4 namespace hosts (root, Linux).

    .venv/bin/python bench/provision.py [--runs 5] [--against REV]

Brings up 4 test hosts (indexes >= 100), provisions them once, then times no-op re-runs: the
whole ``fab provision`` command (process start included) and the in-process part
(``provision_hosts``: SSH + init_vm.sh). Targets: <= 1 s for 1 host, <= 1.5 s for 4 hosts.

``--against REV`` also times ``fab provision`` of git revision REV (its files exported with
``git archive``, same venv, runs interleaved with the working tree's so both see the same load).
The last row is the floor no change of ours can go under: connect and run ``true`` on every host
(SSH handshake, sshd session, the admin user's login shell start-up).
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
from pyalbert.devtools.testhosts import (  # noqa: E402
    DEFAULT_ROOT,
    NamespaceHost,
    claim_index,
    cleanup_stale,
    ensure_client_key,
)
from pyalbert.engine.provision import provision_hosts  # noqa: E402
from tests.support.hosts import DEFAULT_ROUTING, environment_toml  # noqa: E402


def write_env(config: Path, name: str, hosts: list[NamespaceHost]) -> None:
    (config / "environments").mkdir(parents=True, exist_ok=True)
    (config / "environments" / f"{name}.toml").write_text(
        environment_toml(hosts, 'storage_dir = "/data/models"'))
    (config / "llm_routing_table.json").write_text(json.dumps(DEFAULT_ROUTING))


def export_revision(rev: str, dest: Path) -> Path:
    """The files of ``rev`` in ``dest`` (no change to the checkout or its .git)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def timed_fab(config: Path, env: str, environ: dict, tree: Path = REPO) -> float:
    # PYTHONPATH first: pyalbert (and so utils/init_vm.sh) come from ``tree``
    environ = {**environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv/bin/fab"), "-r", str(tree / "deploy"), "provision",
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


def timed_ssh_floor(config: Path, env: str) -> float:
    """Connect as root and run ``true`` on every host at once, as provision_hosts does."""
    from pyalbert.commands.base import Cmd
    from pyalbert.engine.fanout import fan_out
    from pyalbert.remote import SSHRunner

    spec = load_spec(env, config)

    def work(runner, host, cancel):
        return runner.run(Cmd.of("true")).exit_code

    start = time.perf_counter()
    outcomes = fan_out(spec.env.hosts, work,
                       lambda host: SSHRunner(host.model_copy(update={"user": "root"}), spec.env.ssh))
    took = time.perf_counter() - start
    if any(o.error for o in outcomes):
        raise SystemExit(f"ssh failed: {outcomes}")
    return took


def interleaved(runs: int, *timers) -> list[float]:
    """Median of each timer, the timers taking turns (same load for each)."""
    samples: list[list[float]] = [[] for _ in timers]
    for _ in range(runs):
        for column, timer in zip(samples, timers, strict=True):
            column.append(timer())
    return [statistics.median(column) for column in samples]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--against", metavar="REV", help="also time this git revision's fab")
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
        base = export_revision(args.against, config / "base") if args.against else None
        rows = {}
        for env in ("one", "four"):
            timers = [lambda env=env: timed_fab(config, env, environ),
                      lambda env=env: timed_inprocess(config, env, environ),
                      lambda env=env: timed_ssh_floor(config, env)]
            if base:
                timers.append(lambda env=env: timed_fab(config, env, environ, base))
            rows[env] = interleaved(args.runs, *timers)
    finally:
        for host in hosts:
            host.down(purge=True)
        subprocess.run(["rm", "-rf", str(config)])
    load = os.getloadavg()[0]
    print(f"fab provision, no-op re-run (median of {args.runs}; load average {load:.1f} on "
          f"{os.cpu_count()} cores); first run on 4 hosts: {first:.2f} s")
    width = 34
    print(f"{'':{width}}{'1 host':>10}{'4 hosts':>10}{'4/1':>8}{'target':>16}")

    def row(label: str, one: float, four: float, extra: str = "") -> None:
        print(f"{label:{width}}{one:>9.2f}s{four:>9.2f}s{four / one:>8.2f}{extra:>16}")

    one, four = rows["one"], rows["four"]
    if args.against:
        row(f"fab provision ({args.against})", one[3], four[3])
    row("fab provision (working tree)", one[0], four[0], "1 s / 1.5 s")
    if args.against:
        print(f"{'  working tree / ' + args.against:{width}}{one[0] / one[3]:>10.2f}"
              f"{four[0] / four[3]:>10.2f}")
    row("in-process (ssh + init_vm.sh)", one[1], four[1])
    row("floor: ssh + `true` as root", one[2], four[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
