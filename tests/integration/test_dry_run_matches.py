"""The dry-run prints what a real deploy sends: one sequence, two modes.

For the repository's ``staging`` (docker) and ``local`` (venv) environments, pointed at a fresh
namespace host: the commands of ``--dry-run`` (the engine against a recording runner) equal, in
order, the commands a real deploy sent over SSH, modulo probe outcomes: a readiness wait polls
until the server answers (the recorder's unknown answer ends it at once), and the crash-loop probe
only runs while waiting.
"""

from __future__ import annotations

import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from pyalbert.commands.base import Cmd
from pyalbert.config import load_spec
from pyalbert.devtools.test_ca import make_test_ca
from pyalbert.engine.context import RunContext
from pyalbert.engine.host_plans import deploy_plans
from pyalbert.engine.operations import (
    config_files,
    down_env,
    dry_run_commands,
    resolve_secrets,
    run_host_plans,
)
from pyalbert.engine.report import Printer
from pyalbert.engine.setup import setup_env
from pyalbert.remote import Result, SshMaterial, SSHRunner
from pyalbert.runtimes.base import ApiSwap, DeployInputs
from tests.support.images import HAPROXY_IMAGE
from tests.support.runtimes import STORAGE, Env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


class Tap:
    """A real runner that also records what it sent."""

    def __init__(self, inner):
        self.inner, self.commands = inner, []
        self.label = inner.label

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float | None = None) -> Result:
        self.commands.append(cmd)
        return self.inner.run(cmd, check=check, timeout=timeout)

    def close(self) -> None:
        self.inner.close()


def point_at(config_env: str, env: Env, root: Path) -> None:
    """The repository's config folder, its ``config_env`` environment pointed at ``env``'s host."""
    shutil.copytree(REPO / "config", root)
    toml = root / "environments" / f"{config_env}.toml"
    data = tomllib.loads(toml.read_text())
    toml.unlink()
    data["hosts"] = [{"name": env.host.name, "address": env.host.address, "user": "gitlab",
                      "gpus": 0}]
    data["storage_dir"] = str(STORAGE)
    data["deploy"] = {**data.get("deploy", {}), "base_dir": env.base, "ready_timeout_s": 60}
    if data.get("metrics", {}).get("scrape_key_file"):  # as local-up does: the key on the host
        key = f"{env.base}/scrape-key"
        data["metrics"]["scrape_key_file"] = key
        env.host.run(f"mkdir -p {env.base} && printf test-scrape-key > {key} && chmod 600 {key} "
                     f"&& chown -R gitlab: {env.base}")
    if env.runtime == "docker":
        data["images"] = {"vllm": env.rh.vllm, "api": env.rh.vllm, "edge": HAPROXY_IMAGE}
    else:
        data["vllm"] = {**data.get("vllm", {}), "python": env.rh.vllm}
    (root / "environments" / f"{config_env}.yaml").write_text(yaml.safe_dump(data))
    routing = yaml.safe_load((root / data.get("routing_table", "llm_routing_table.json")).read_text())
    for model_id in routing:
        (STORAGE / model_id).mkdir(parents=True, exist_ok=True)


def normalise(cmds: list[Cmd], host_plan) -> list[str]:
    """Display strings, with what a readiness wait repeats collapsed: a unit's probe and restart
    count after its start (the crash-loop check) dropped, consecutive repeats (polls) once."""
    rt = host_plan.runtime
    units = [c for u in host_plan.units for c in
             ([u.edge, *u.colours.values()] if isinstance(u, ApiSwap) else [u])]
    polls = {u.start.display(): {u.probe.display(), rt.restarts(u.name).display()} for u in units}
    dropped: set[str] = set()
    out: list[str] = []
    for cmd in cmds:
        shown = cmd.display()
        dropped |= polls.get(shown, set())
        if shown in dropped or (out and out[-1] == shown):
            continue
        out.append(shown)
    return out


@pytest.mark.parametrize("config_env, runtime_host", [("staging", "docker"), ("local", "venv")],
                         ids=["staging-docker", "local-venv"], indirect=["runtime_host"])
def test_dry_run_equals_what_a_real_deploy_sent(config_env, runtime_host, tmp_path, monkeypatch):
    env = Env(runtime_host, tmp_path / "unused", monkeypatch, config_env)
    root = tmp_path / "config"
    point_at(config_env, env, root)
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}\n')
    monkeypatch.setenv("ALBERT_API_KEYS", str(keys))  # staging's api needs its keys file
    # as local-up does: local's front door serves a test CA's certificate (a File variable)
    monkeypatch.setenv("ALBERT_TLS_CERT", str(make_test_ca(tmp_path / "ca", (env.host.address,)) / "server.pem"))
    spec = load_spec(config_env, root)
    if env.runtime == "venv":  # as local-up does: the whitelist is built on the host first
        assert not [o.error for o in setup_env(spec, service="api") if o.error]
    ctx = RunContext(who="ana@laptop", pipeline="42", poll_s=0.2, min_free_mib=1,
                     clock=lambda: datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    inputs = DeployInputs(release_id="20260102-030405-abcdef", secrets=resolve_secrets(spec),
                          config_files=config_files(spec))
    (hp,) = deploy_plans(spec.placement, inputs, min_free_mib=ctx.min_free_mib)

    planned = dry_run_commands([hp], ctx)[hp.host.name]
    material = SshMaterial.from_environ(spec.env.ssh)
    tap = Tap(SSHRunner(hp.host, spec.env.ssh, material))
    try:
        (result,) = run_host_plans([hp], "deploy", lambda host: tap, Printer(quiet=True), ctx)
        assert result.status == "deployed", result.error
        assert normalise(planned, hp) == normalise(tap.commands, hp)
        assert len(planned) > 20  # the whole deploy: checks, lock, files, units, manifest, unlock
    finally:
        down_env(spec)
