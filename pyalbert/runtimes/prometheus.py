"""The environment's Prometheus as a unit of the release (``[metrics] enabled = true``).

Its files (:func:`pyalbert.observability.render_all`) go into the release folder
(``<release>/prometheus/``) and Prometheus reads them through the link
``<base_dir>/prometheus-<env>/config`` that points at one release's folder. When only the files
change (thresholds, targets) the engine points the link at the new release and reloads
Prometheus in place (``/-/reload``, :class:`~pyalbert.runtimes.base.Reload`); a rollback points
it back and reloads. The unit restarts only when its own command or image changes (its config
hash leaves the files out). Before anything changes, the preflight check :class:`PromtoolAccepts`
sends the files to a scratch folder on the host and has ``promtool`` check the config, the rules
and the rules' unit tests: a refused config fails the deploy while every unit still runs.

venv runtime: a supervised ``/usr/bin/prometheus`` (Debian's package) as the deploy user; docker
runtime: ``images.prometheus`` with ``--network host``. Data under
``<base_dir>/prometheus-<env>/data`` either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pyalbert.commands import docker, health, process, release
from pyalbert.commands.base import Cmd, combine
from pyalbert.config.environment import EnvironmentSpec
from pyalbert.config.placement import Placement
from pyalbert.observability import commands as oc
from pyalbert.observability import render_all
from pyalbert.observability.render import CONFIG_FILE, RULE_TESTS_FILE
from pyalbert.observability.rules import RULES_FILE
from pyalbert.remote import Result
from pyalbert.runtimes.base import FileSpec, Reload, Runtime, Unit, config_hash, labels
from pyalbert.runtimes.checks import Check, HostFacts

#: Debian's package (``./scripts/bootstrap``, ``fab provision``)
PROMETHEUS_BIN = "/usr/bin/prometheus"
#: writes each file of a JSON object read on stdin into the folder argv[1] names
UNPACK = ("import json,pathlib,sys;d=pathlib.Path(sys.argv[1]);"
          "[(d/n).write_text(t) for n,t in json.load(sys.stdin).items()]")


def unit_name(env: str) -> str:
    return f"albert-{env}-prometheus"


def root(env: EnvironmentSpec) -> str:
    return f"{env.deploy.base_dir}/prometheus-{env.name}"


def config_link(env: EnvironmentSpec) -> str:
    """The folder Prometheus reads its files from: a link to one release's ``prometheus/``."""
    return f"{root(env)}/config"


#: in each release's ``prometheus/``: the digest of its files (what a reload compares)
DIGEST_FILE = "files.sha"


def point_at(env: EnvironmentSpec, release_dir: str) -> Cmd:
    """Point :func:`config_link` at ``release_dir``'s files atomically (symlink + rename)."""
    link = config_link(env)
    return combine(Cmd.of("mkdir", "-p", root(env)),
                   Cmd.of("ln", "-sfn", f"{release_dir}/prometheus", f"{link}.tmp"),
                   Cmd.of("mv", "-Tf", f"{link}.tmp", link))


def reload(env: EnvironmentSpec, release_dir: str, digest: str) -> Reload:
    """This release's files in place of the running ones: link, then ``/-/reload`` (refused
    files: curl fails, Prometheus keeps its old config)."""
    return Reload(digest=digest, probe=Cmd.of("cat", f"{config_link(env)}/{DIGEST_FILE}"),
                  apply=combine(point_at(env, release_dir),
                                oc.reload_http(f"http://127.0.0.1:{env.metrics.port}")))


@dataclass(frozen=True)
class PromtoolAccepts(Check):
    """promtool accepts the rendered config, rules and rule tests (in a scratch folder)."""

    files: tuple[tuple[str, str], ...]
    scratch: str

    @property
    def what(self) -> str:  # type: ignore[override]
        return "promtool accepts the Prometheus config and rules"

    @property
    def cmd(self) -> Cmd:
        d = self.scratch
        steps = combine(Cmd.of("rm", "-rf", d), Cmd.of("mkdir", "-p", d),
                        Cmd.of("python3", "-c", UNPACK, d),
                        oc.check_config(f"{d}/{CONFIG_FILE}"),
                        oc.check_rules(f"{d}/{RULES_FILE}"),
                        oc.test_rules(f"{d}/{RULE_TESTS_FILE}"))
        return Cmd(steps.tokens, stdin=json.dumps(dict(self.files)))

    def judge(self, res: Result, host: HostFacts) -> str | None:
        if res.ok:
            return None
        lines = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
        said = " ".join(line.strip() for line in lines) or "no output"
        return (f"promtool refused the Prometheus config rendered from [metrics] ({said}); nothing "
                f"was changed. Fix: correct [metrics] of environments/{host.env}.toml (thresholds, "
                f"durations), check it with `albert config check --env {host.env}`.")


def serve_argv(env: EnvironmentSpec, prometheus: str) -> list[str]:
    cmd = oc.serve(env.metrics, f"{config_link(env)}/{CONFIG_FILE}", f"{root(env)}/data",
                   prometheus=prometheus)
    return [str(t) for t in cmd.tokens]


def docker_start(env: EnvironmentSpec, release_dir: str, unit_labels: dict[str, str]) -> Cmd:
    """The container: host network (scrapes loopback servers), runs as the deploy user; it sees
    the releases (read-only) and its own folder, so the config link resolves inside."""
    argv = serve_argv(env, PROMETHEUS_BIN)
    data, releases = f"{root(env)}/data", release.releases_dir(env.deploy.base_dir)
    return combine(point_at(env, release_dir), Cmd.of("mkdir", "-p", data), docker.run(
        unit_name(env.name), env.images.prometheus, argv[1:], network="host",
        volumes=[f"{releases}:{releases}:ro", f"{root(env)}:{root(env)}"],
        user=docker.AS_DEPLOY_USER, labels=unit_labels))


def venv_start(env: EnvironmentSpec, release_dir: str, unit_labels: dict[str, str],
               albert: str, state: str) -> Cmd:
    """A process supervised by ``albert supervise``, as the deploy user."""
    argv = serve_argv(env, PROMETHEUS_BIN)
    return combine(point_at(env, release_dir), Cmd.of("mkdir", "-p", f"{root(env)}/data"),
                   process.start(albert, state, unit_name(env.name), argv, labels=unit_labels))


def prometheus_unit(placement: Placement, runtime: Runtime, release_id: str,
                    release_dir: str) -> tuple[Unit, list[FileSpec], list[Check]]:
    """The unit, its release files, its preflight checks (promtool, its port)."""
    env = placement.spec.env
    name, files = unit_name(env.name), render_all(placement, env.metrics)
    image = env.images.prometheus if runtime.name == "docker" else PROMETHEUS_BIN
    # its own command only: changed files are a reload (Unit.reload), not a restart
    digest = config_hash({"runtime": runtime.name, "image": image,
                          "argv": serve_argv(env, PROMETHEUS_BIN)})
    files_digest = config_hash({"files": files})
    unit_labels = labels(env.name, "prometheus", None, release_id, digest)
    if runtime.name == "docker":
        start = docker_start(env, release_dir, unit_labels)
    else:
        start = venv_start(env, release_dir, unit_labels, runtime.albert, runtime.state)  # type: ignore[attr-defined]
    unit = Unit(name=name, service="prometheus", config_hash=digest, start=start,
                stop=runtime.stop(name), probe=runtime.probe(name), logs=runtime.logs(name, 40),
                ready=health.ReadyCheck(env.metrics.port, path="/-/ready"), port=env.metrics.port,
                reload=reload(env, release_dir, files_digest))
    release_files = [FileSpec(f"{release_dir}/prometheus/{n}", text)
                     for n, text in sorted({**files, DIGEST_FILE: files_digest + "\n"}.items())]
    checks: list[Check] = [PromtoolAccepts(tuple(sorted(files.items())), f"{root(env)}/check")]
    return unit, release_files, checks
