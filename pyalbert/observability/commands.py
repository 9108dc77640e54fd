"""Commands as data for an environment's Prometheus: check, install (checked first), serve,
reload, and the GPU lease as a node-exporter textfile. Pure builders returning ``Cmd``; the
deploy engine runs them.
"""

from __future__ import annotations

from datetime import datetime

from pyalbert.commands.base import Cmd, combine
from pyalbert.commands.gpu import Lease
from pyalbert.commands.release import put
from pyalbert.observability import promql
from pyalbert.observability.render import CONFIG_FILE, RULE_TESTS_FILE
from pyalbert.observability.rules import RULES_FILE
from pyalbert.observability.spec import MetricsSpec

PROMTOOL = "promtool"
PROMETHEUS = "prometheus"
LEASE_TEXTFILE = "albert-gpu-lease.prom"


def check_config(config_file: str, promtool: str = PROMTOOL) -> Cmd:
    """``promtool check config``: the config and every rule file it names (exit 1 if bad)."""
    return Cmd.of(promtool, "check", "config", config_file)


def check_rules(*rule_files: str, promtool: str = PROMTOOL) -> Cmd:
    return Cmd.of(promtool, "check", "rules", rule_files)


def test_rules(test_file: str, promtool: str = PROMTOOL) -> Cmd:
    """``promtool test rules``: the alerts' unit tests (rule files named relative to it)."""
    return Cmd.of(promtool, "test", "rules", test_file)


test_rules.__test__ = False  # a builder, not a pytest test


def install(files: dict[str, str], config_dir: str, promtool: str = PROMTOOL) -> list[Cmd]:
    """Write ``files`` into ``<config_dir>.new``, check them there, then move them in place.

    Run in order, stopping at the first failure: a config or rule file promtool refuses never
    replaces the running one. The last step is the only one that touches ``config_dir``.
    """
    staging = f"{config_dir}.new"
    # 0755, not the releases' 0700: Prometheus may run as its own user (Debian's package)
    steps = [Cmd.of("rm", "-rf", staging), Cmd.of("mkdir", "-p", staging)]
    steps += [put(f"{staging}/{name}", content) for name, content in sorted(files.items())]
    if CONFIG_FILE in files:
        steps.append(check_config(f"{staging}/{CONFIG_FILE}", promtool))
    if RULES_FILE in files:
        steps.append(check_rules(f"{staging}/{RULES_FILE}", promtool=promtool))
    if RULE_TESTS_FILE in files:
        steps.append(test_rules(f"{staging}/{RULE_TESTS_FILE}", promtool))
    moves = [Cmd.of("mv", "-f", f"{staging}/{name}", f"{config_dir}/{name}") for name in sorted(files)]
    steps.append(combine(Cmd.of("mkdir", "-p", config_dir), *moves, Cmd.of("rmdir", staging)))
    return steps


def serve(metrics: MetricsSpec, config_file: str, data_dir: str, *, listen: str | None = None,
          prometheus: str = PROMETHEUS) -> Cmd:
    """The Prometheus server: retention from ``metrics``, ``/-/reload`` enabled."""
    return Cmd.of(
        prometheus,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={metrics.retention}",
        (f"--storage.tsdb.retention.size={metrics.retention_size}" if metrics.retention_size else None),
        f"--web.listen-address={listen or f'0.0.0.0:{metrics.port}'}",
        "--web.enable-lifecycle",
    )


def reload_http(base_url: str) -> Cmd:
    """Graceful reload through the API (``--web.enable-lifecycle``); fails if the config is bad."""
    return Cmd.of("curl", "-fsS", "-X", "POST", f"{base_url.rstrip('/')}/-/reload")


def reload_signal(pid_file: str) -> Cmd:
    """Graceful reload by SIGHUP to the pid in ``pid_file`` (the venv runtime's supervisor)."""
    return Cmd.of("pkill", "-HUP", "-F", pid_file)


def query(base_url: str, expr: str) -> Cmd:
    """An instant query (JSON on stdout), asked on the Prometheus host (``fab status``)."""
    return Cmd.of("curl", "-fsS", "--max-time", "10", "-G", "--data-urlencode", f"query={expr}",
                  f"{base_url.rstrip('/')}/api/v1/query")


def scrape(address: str) -> Cmd:
    """A server's own ``/metrics`` (``host:port``), read on its host."""
    return Cmd.of("curl", "-fsS", "--max-time", "5", f"http://{address}/metrics")


def is_ready(base_url: str) -> Cmd:
    """Exit 0 once Prometheus serves queries."""
    return Cmd.of("curl", "-fsS", "-o", "/dev/null", f"{base_url.rstrip('/')}/-/ready")


# -- the GPU lease as a metric ---------------------------------------------------------------------
def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def lease_textfile(lease: Lease) -> str:
    """Node-exporter textfile for a held lease: when it expires (``AlbertGpuLeaseOverdue``)."""
    expires = datetime.fromisoformat(lease.expires).timestamp()
    labels = f'env="{_label(lease.env)}",pipeline="{_label(lease.pipeline)}",who="{_label(lease.who)}"'
    return (f"# HELP {promql.GPU_LEASE_EXPIRY} When the GPU lease of the environment expires.\n"
            f"# TYPE {promql.GPU_LEASE_EXPIRY} gauge\n"
            f"{promql.GPU_LEASE_EXPIRY}{{{labels}}} {expires:.0f}\n")


def write_lease_textfile(textfile_dir: str, lease: Lease) -> Cmd:
    """Call where the lease is taken or renewed (``link-gpu``)."""
    return put(f"{textfile_dir}/{LEASE_TEXTFILE}", lease_textfile(lease))


def remove_lease_textfile(textfile_dir: str) -> Cmd:
    """Call where the lease is released (``unlink-gpu``)."""
    return Cmd.of("rm", "-f", f"{textfile_dir}/{LEASE_TEXTFILE}")
