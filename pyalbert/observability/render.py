"""Pure renderers: a resolved :class:`~pyalbert.config.Placement` and a :class:`MetricsSpec` in, the
files of an environment's Prometheus out (``prometheus.yml``, the rule file, its unit tests,
``alertmanager.yml``). Nothing here reads a host or a secret: the gateway's scrape key stays in
the file ``metrics.scrape_key_file`` names on the Prometheus host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pyalbert.config.environment import HostSpec
from pyalbert.config.placement import Placement
from pyalbert.errors import ConfigError, Problem
from pyalbert.observability import rules as r
from pyalbert.observability.spec import MetricsSpec

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "observability"
CONFIG_FILE = "prometheus.yml"
RULE_TESTS_FILE = "albert-rules.test.yml"
ALERTMANAGER_FILE = "alertmanager.yml"
#: series nobody reads: dropped at scrape time (vLLM exposes ~600 lines per server)
DROP = r".+_created|http_request_duration_highr_seconds.*|python_gc_.+"


@dataclass(frozen=True)
class Target:
    address: str  # host:port
    host: str  # host name in the environment
    unit: str  # container/unit name (albert-<env>-vllm-<model>[-N])
    model: str = ""
    replica: str = ""
    slot: str = ""  # "spare": the replica's second port, where a replace without downtime moves it


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def targets(plan: Placement) -> tuple[list[Target], list[Target]]:
    """(vLLM servers, gateways) of the plan, as scrape targets."""
    # where each server listens (loopback when its only gateway, and Prometheus, are on its host);
    # both slots of a replica: after a replace without downtime it serves on its spare port
    vllm = [Target(hostport(s.address, s.port), s.host.name, s.name, s.model_id, str(s.replica),
                   "spare" if s.spare else "")
            for i in plan.vllm for s in ((i,) if i.group is not None else (i, i.spare_slot()))]
    api = [Target(hostport(a.host.address, a.port), a.host.name, a.name) for a in plan.api]
    return vllm, api


def prometheus_host(plan: Placement, metrics: MetricsSpec) -> HostSpec:
    """The host that runs Prometheus: ``metrics.host``, else the first host running the api."""
    env = plan.spec.env
    if metrics.host is None:
        return plan.api[0].host if plan.api else env.hosts[0]
    try:
        return env.host(metrics.host)
    except KeyError:
        raise ConfigError(Problem(str(plan.spec.env_file), "metrics.host",
                                  f"host {metrics.host!r} is not in 'hosts'",
                                  "name one of " + ", ".join(h.name for h in env.hosts))) from None


def _jinja() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                       autoescape=False)


def prometheus_config(plan: Placement, metrics: MetricsSpec, *, rule_files: tuple[str, ...] = (r.RULES_FILE,),
                      self_address: str | None = None) -> str:
    """``prometheus.yml``: every vLLM server and gateway of the plan; rule files relative to it."""
    vllm, api = targets(plan)
    if self_address is None:
        self_address = hostport("127.0.0.1", metrics.port)
    text = _jinja().get_template("prometheus.yml.j2").render(
        env=plan.spec.env.name, metrics=metrics, vllm=vllm, api=api, hosts=plan.hosts,
        rule_files=rule_files, drop=DROP, self_address=self_address,
        api_tls=plan.spec.env.edge.tls != "off")
    yaml.safe_load(text)  # a template bug must not reach promtool on a host
    return text


def rules_file(metrics: MetricsSpec) -> str:
    return r.dump(r.rules(metrics.alerts))


def rule_tests_file(metrics: MetricsSpec, rule_file: str = r.RULES_FILE) -> str:
    return r.dump(r.rule_tests(metrics.alerts, rule_file))


def alertmanager_config(env: str, metrics: MetricsSpec) -> str | None:
    am = metrics.alertmanager
    if am is None:
        return None
    return _jinja().get_template("alertmanager.yml.j2").render(
        env=env, receiver="webhook" if am.webhook_url else "none", webhook_url=am.webhook_url)


def render_all(plan: Placement, metrics: MetricsSpec) -> dict[str, str]:
    """File name -> content: what goes into the Prometheus config folder of a release."""
    files = {
        CONFIG_FILE: prometheus_config(plan, metrics),
        r.RULES_FILE: rules_file(metrics),
        RULE_TESTS_FILE: rule_tests_file(metrics),
    }
    am = alertmanager_config(plan.spec.env.name, metrics)
    if am is not None:
        files[ALERTMANAGER_FILE] = am
    return files
