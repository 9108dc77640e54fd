"""What a deploy does on each host, as data: a pure function of the resolved plan and inputs.

``deploy_plans(plan, inputs)`` returns one :class:`HostPlan` per host: the preflight checks, the
files of the new release, and the *units* (long-running servers) in start order. A unit carries
the commands to probe, start, stop and read logs of it, a readiness check and its config hash; the
deployer (``pyalbert.deployer``) only runs these commands, so another runtime (a venv with
supervised processes) plugs in by providing another :class:`Runtime` with the same methods.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pyalbert.commands import api as api_cmd
from pyalbert.commands import docker, health, release
from pyalbert.commands.base import Cmd, Raw
from pyalbert.commands.setup import SetupPaths
from pyalbert.commands.vllm import server_args
from pyalbert.config.environment import EnvironmentSpec, HostSpec
from pyalbert.config.plan import Plan, VllmInstance
from pyalbert.errors import AlbertError

TEMPLATES = Path(__file__).parent / "templates"
#: free space a host needs under base_dir and the docker data root (MiB); tests lower/raise it
MIN_FREE_MIB = int(os.environ.get("ALBERT_MIN_FREE_MIB", "1024"))
MODEL_MOUNT = "/models"

ServiceName = Literal["vllm", "api", "edge"]


@lru_cache(maxsize=1)
def _jinja() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                       keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                       autoescape=False)


def render(template: str, **values: object) -> str:
    return _jinja().get_template(template).render(**values)


def template_text(name: str) -> str:
    return (TEMPLATES / name).read_text()


def config_hash(material: Mapping[str, object]) -> str:
    """12 hex chars of sha256 over canonical JSON (secrets enter as their own hashes)."""
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def secret_digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    """A file the release puts on the host (rendered here, written with ``write_file``)."""

    path: str
    content: str
    secret: bool = False

    def cmd(self) -> Cmd:
        return release.put(self.path, self.content, secret=self.secret)


@dataclass(frozen=True)
class Check:
    """A preflight check: ``cmd``'s output goes to ``verdict``, which returns an error or None."""

    what: str
    cmd: Cmd
    kind: Literal["docker", "model_dir", "disk", "port", "tools", "python"]
    arg: str = ""


@dataclass(frozen=True)
class Unit:
    """One long-running server on one host, runtime-neutral."""

    name: str
    service: ServiceName
    config_hash: str
    start: Cmd
    stop: Cmd
    probe: Cmd  # -> (running, config hash, release): see Runtime.parse_state
    logs: Cmd
    ready: health.ReadyCheck | None
    model_id: str | None = None
    port: int | None = None
    #: files written (before start) into the unit's own place (not the release dir), e.g. the edge
    files: tuple[FileSpec, ...] = ()


@dataclass(frozen=True)
class ApiSwap:
    """The api: two colours on spare ports behind the edge; deploy starts the idle colour."""

    edge: Unit
    colours: Mapping[str, Unit]  # "blue"/"green" -> unit on its spare port
    upstream_file: str
    read_upstream: Cmd

    @property
    def config_hash(self) -> str:
        return next(iter(self.colours.values())).config_hash

    def switch(self, colour: str) -> Cmd:
        return api_cmd.switch_upstream(self.upstream_file, self.colours[colour].port or 0)


@dataclass(frozen=True)
class HostPlan:
    host: HostSpec
    env: str
    base_dir: str
    release_id: str
    checks: tuple[Check, ...]
    files: tuple[FileSpec, ...]
    units: tuple[Unit | ApiSwap, ...]
    ready_timeout_s: float
    keep_releases: int
    #: remove containers of this env that the plan does not name (only for a full deploy)
    remove_orphans: bool = True
    runtime: Runtime = field(default=None)  # type: ignore[assignment]

    @property
    def release_dir(self) -> str:
        return release.release_dir(self.base_dir, self.release_id)

    def names(self) -> set[str]:
        out: set[str] = set()
        for u in self.units:
            if isinstance(u, ApiSwap):
                out |= {u.edge.name, *(c.name for c in u.colours.values())}
            else:
                out.add(u.name)
        return out

    def steps(self) -> list[tuple[str, list[Cmd]]]:
        """Ordered steps with their commands, as ``--dry-run`` shows them (all as if changed)."""
        from pyalbert.commands import lock

        out: list[tuple[str, list[Cmd]]] = [(f"check: {c.what}", [c.cmd]) for c in self.checks]
        out.append(("take the deploy lock", [lock.acquire(self.base_dir, "<details>")]))
        out.append(("probe running units", [u.probe if isinstance(u, Unit) else u.edge.probe
                                            for u in self.units]))
        out.append((f"write release {self.release_id}",
                     [release.ensure_dir(self.release_dir), *(f.cmd() for f in self.files)]))
        for u in self.units:
            if isinstance(u, ApiSwap):
                blue = u.colours["blue"]
                out.append((f"start {blue.name} (the idle colour; config {blue.config_hash})",
                            [blue.stop, blue.start]))
                if blue.ready:
                    out.append((blue.ready.display(), [blue.ready.health()]))
                out.append((f"(if its config changed) restart the edge {u.edge.name}",
                            [*(f.cmd() for f in u.edge.files), u.edge.stop, u.edge.start]))
                out.append(("switch the edge to the new colour, stop the other one gracefully",
                            [u.switch("blue"), u.colours["green"].stop]))
            else:
                out.append((f"replace {u.name} (config {u.config_hash})", [u.stop, u.start]))
                if u.ready:
                    out.append((u.ready.display(), [u.ready.health(), u.ready.models()]))
        out.append(("record the release, keep the newest "
                    f"{self.keep_releases}", [release.set_current(self.base_dir, self.release_id)]))
        out.append(("release the deploy lock", [lock.release(self.base_dir)]))
        return out


@dataclass(frozen=True)
class DeployInputs:
    """What a plan needs beyond the config, resolved by the task (I/O stays out of plans)."""

    release_id: str
    #: secret name (``hf_token``, ``api_keys``) -> value
    secrets: Mapping[str, str] = field(default_factory=dict)
    #: files of the config folder the api container needs: relative path -> text
    config_files: Mapping[str, str] = field(default_factory=dict)
    service: Literal["vllm", "api", "all"] = "all"
    model: str | None = None


# --- the runtime seam --------------------------------------------------------------------------


class Runtime(Protocol):
    """Builders one runtime provides; the plan and the deployer never name docker themselves."""

    name: str

    def vllm_unit(self, inst: VllmInstance, plan: Plan, inputs: DeployInputs,
                  release_dir: str) -> tuple[Unit, list[FileSpec]]: ...

    def api_swap(self, plan: Plan, host: HostSpec, inputs: DeployInputs,
                 release_dir: str) -> tuple[ApiSwap, list[FileSpec]]: ...

    def probe(self, name: str) -> Cmd: ...

    def list_units(self, env: str) -> Cmd: ...

    def parse_units(self, stdout: str) -> list[dict[str, str]]: ...

    def parse_state(self, stdout: str) -> tuple[bool, str, str]: ...

    def restarts(self, name: str) -> Cmd: ...

    def parse_restarts(self, stdout: str) -> int: ...

    def stop(self, name: str) -> Cmd: ...

    def reload(self, name: str) -> Cmd: ...

    def logs(self, name: str, tail: int, follow: bool = False) -> Cmd: ...

    def checks(self) -> list[Check]: ...


def _env_lines(env: Mapping[str, str], unit: str) -> list[tuple[str, str]]:
    for key, value in env.items():
        if "\n" in value or "\r" in value:
            raise AlbertError(f"the environment of {unit} has a value with a line break in {key}. "
                              "Fix: use a single-line value (env files hold one variable a line).")
    return sorted(env.items())


class DockerRuntime:
    """Containers: ``docker run`` per unit, labels for probes, ``--env-file`` for secrets."""

    name = "docker"

    def labels(self, env: str, service: str, model: str | None, release_id: str,
               config_hash: str) -> dict[str, str]:
        return {"albert.env": env, "albert.service": service, "albert.model": model or "",
                "albert.release": release_id, "albert.config-hash": config_hash}

    def vllm_unit(self, inst: VllmInstance, plan: Plan, inputs: DeployInputs,
                  release_dir: str) -> tuple[Unit, list[FileSpec]]:
        env = plan.spec.env
        args = server_args(inst.model_id, inst.model, model_path=f"{MODEL_MOUNT}/{inst.model_id}",
                           port=inst.port, extra_args=env.vllm.extra_args)
        environ = {**env.vllm.env, **inst.model.env}
        hf = inputs.secrets.get("hf_token")
        if hf:
            environ |= {"HF_TOKEN": hf, "HUGGING_FACE_HUB_TOKEN": hf}
        env_path = f"{release_dir}/{inst.name}.env"
        material = {"image": env.images.vllm, "args": args, "port": inst.port,
                    "gpus": list(inst.gpu_ids), "storage": env.storage_dir,
                    "env": {k: (secret_digest(v) if k.startswith(("HF_", "HUGGING")) else v)
                            for k, v in environ.items()}}
        digest = config_hash(material)
        env_file = FileSpec(env_path, render("unit.env.j2", unit=inst.name, release=inputs.release_id,
                                             env=_env_lines(environ, inst.name)), secret=True)
        start = docker.run(
            inst.name, env.images.vllm, args,
            ports=[f"{inst.port}:{inst.port}"],
            volumes=[f"{env.storage_dir}/{inst.model_id}:{MODEL_MOUNT}/{inst.model_id}:ro"],
            env_file=env_path, gpu_ids=inst.gpu_ids, ipc_host=True,
            labels=self.labels(env.name, "vllm", inst.model_id, inputs.release_id, digest),
        )
        unit = Unit(
            name=inst.name, service="vllm", config_hash=digest, start=start,
            stop=docker.stop(inst.name), probe=docker.inspect_state(inst.name),
            logs=docker.logs(inst.name, 40), ready=health.ReadyCheck(inst.port, inst.model_id),
            model_id=inst.model_id, port=inst.port,
        )
        return unit, [env_file]

    def api_swap(self, plan: Plan, host: HostSpec, inputs: DeployInputs,
                 release_dir: str) -> tuple[ApiSwap, list[FileSpec]]:
        env = plan.spec.env
        edge_dir = f"{plan.spec.env.deploy.base_dir}/edge-{env.name}"
        upstream = f"{edge_dir}/upstream"
        backends = {m: urls for m, urls in plan.backends.items()}
        files = [FileSpec(f"{release_dir}/backends.json", render("backends.json.j2", backends=backends))]
        keys = inputs.secrets.get("api_keys")
        if keys:
            files.append(FileSpec(f"{release_dir}/keys.json", keys, secret=True))
        for rel, text in sorted(inputs.config_files.items()):
            files.append(FileSpec(f"{release_dir}/config/{rel}", text))
        whitelist = env.whitelist.configured
        serve = api_cmd.serve_args(env.name, env.api.port, keys=bool(keys), whitelist=whitelist,
                                   workers=env.api.workers)
        material = {"image": env.images.api, "args": serve, "port": env.api.port,
                    "files": {f.path.removeprefix(release_dir): (secret_digest(f.content) if f.secret
                                                                 else f.content) for f in files}}
        digest = config_hash(material)
        into = api_cmd.IN_CONTAINER
        volumes = [f"{release_dir}/backends.json:{into}/backends.json:ro",
                   f"{release_dir}/config:{into}/config:ro"]
        if keys:
            volumes.append(f"{release_dir}/keys.json:{into}/keys.json:ro")
        if whitelist:
            # where the setup stage builds it on the host (create_whitelist --output)
            volumes.append(f"{SetupPaths(env.deploy.base_dir).whitelist}:{into}/whitelist.json:ro")
        colours = {}
        for colour in api_cmd.COLOURS:
            name = f"albert-{env.name}-api-{colour}"
            spare = api_cmd.spare_port(env.api.port, colour)
            start = docker.run(
                name, env.images.api, serve[1:], entrypoint=serve[0],
                ports=[f"127.0.0.1:{spare}:{env.api.port}"], volumes=volumes,
                user=docker.AS_DEPLOY_USER,
                labels=self.labels(env.name, "api", colour, inputs.release_id, digest),
            )
            colours[colour] = Unit(
                name=name, service="api", config_hash=digest, start=start,
                stop=docker.stop(name), probe=docker.inspect_state(name),
                logs=docker.logs(name, 40), ready=health.ReadyCheck(spare), port=spare,
            )
        edge_script = template_text("edge.py")
        edge_args = api_cmd.edge_args(env.api.port, "/edge/upstream")
        edge_hash = config_hash({"image": env.images.api, "args": edge_args, "script": edge_script})
        edge_name = f"albert-{env.name}-api"
        edge = Unit(
            name=edge_name, service="edge", config_hash=edge_hash,
            start=docker.run(edge_name, env.images.api, edge_args[1:], entrypoint=edge_args[0],
                             network="host", volumes=[f"{edge_dir}:/edge:ro"],
                             user=docker.AS_DEPLOY_USER,
                             labels=self.labels(env.name, "edge", None, inputs.release_id, edge_hash)),
            stop=docker.stop(edge_name, 5), probe=docker.inspect_state(edge_name),
            logs=docker.logs(edge_name, 40), ready=None, port=env.api.port,
            files=(FileSpec(f"{edge_dir}/edge.py", edge_script),),
        )
        swap = ApiSwap(edge=edge, colours=colours, upstream_file=upstream,
                       read_upstream=api_cmd.read_upstream(upstream))
        return swap, files

    def probe(self, name: str) -> Cmd:
        return docker.inspect_state(name)

    def list_units(self, env: str) -> Cmd:
        return docker.ps(env)

    def parse_units(self, stdout: str) -> list[dict[str, str]]:
        rows = []
        for line in stdout.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            labels = dict(kv.split("=", 1) for kv in row.get("Labels", "").split(",") if "=" in kv)
            rows.append({"name": row.get("Names", ""), "image": row.get("Image", ""),
                         "state": row.get("State", ""), "status": row.get("Status", ""),
                         "ports": row.get("Ports", ""), "service": labels.get("albert.service", ""),
                         "model": labels.get("albert.model", ""),
                         "release": labels.get("albert.release", ""),
                         "config_hash": labels.get("albert.config-hash", "")})
        return rows

    def parse_state(self, stdout: str) -> tuple[bool, str, str]:
        return docker.parse_state(stdout)

    def restarts(self, name: str) -> Cmd:
        """Probe: how many times docker restarted the container (a crash loop before ready)."""
        return Cmd.of("docker", "inspect", "--format", "{{.RestartCount}}", name)

    def parse_restarts(self, stdout: str) -> int:
        text = stdout.strip()
        return int(text) if text.isdigit() else 0

    def stop(self, name: str) -> Cmd:
        return docker.stop(name)

    def reload(self, name: str) -> Cmd:
        return docker.kill_signal(name, "HUP")

    def logs(self, name: str, tail: int, follow: bool = False) -> Cmd:
        return docker.logs(name, tail, follow=follow)

    def checks(self) -> list[Check]:
        return [Check("docker answers", docker.server_version(), "docker")]


def runtime_for(env: EnvironmentSpec) -> Runtime:
    """The environment's runtime: containers, or supervised processes from a venv."""
    if env.runtime == "venv":
        from pyalbert.venv_runtime import VenvRuntime

        return VenvRuntime(env)
    return DockerRuntime()


# --- plans -------------------------------------------------------------------------------------


def deploy_plans(plan: Plan, inputs: DeployInputs, runtime: Runtime | None = None) -> list[HostPlan]:
    """One :class:`HostPlan` per host that has something to run (vLLM first, then the api)."""
    spec = plan.spec
    env = spec.env
    runtime = runtime or runtime_for(env)
    if inputs.model and inputs.model not in spec.models.root:
        raise AlbertError(f"--model {inputs.model!r} is not in the routing table "
                          f"({spec.routing_file.name}). Fix: use one of {', '.join(spec.models.ids())}.")
    if (inputs.service in ("api", "all") and not inputs.model and "api_keys" not in inputs.secrets
            and env.tier in ("production", "staging")):
        ref = env.secrets["api_keys"]
        raise AlbertError(
            f"the {env.tier} api needs its keys file and ${ref.env} is not set. Fix: set the CI/CD "
            f"variable {ref.env} (type File) to a keys file (hashed keys: `albert api hash-key`); "
            "only development and testing environments may run the api without keys."
        )
    base = env.deploy.base_dir
    rel_dir = release.release_dir(base, inputs.release_id)
    out = []
    for host in env.hosts:
        units: list[Unit | ApiSwap] = []
        files: list[FileSpec] = []
        checks: list[Check] = list(runtime.checks())
        checks.append(Check(f"{MIN_FREE_MIB} MiB free under {base}", health.free_kib(base), "disk",
                            str(MIN_FREE_MIB)))
        if inputs.service in ("vllm", "all"):
            for inst in plan.vllm_on(host.name):
                if inputs.model and inst.model_id != inputs.model:
                    continue
                unit, unit_files = runtime.vllm_unit(inst, plan, inputs, rel_dir)
                units.append(unit)
                files += unit_files
                model_dir = f"{env.storage_dir}/{inst.model_id}"
                checks.append(Check(f"model {inst.model_id} is in {model_dir}",
                                    health.path_exists(model_dir), "model_dir", inst.model_id))
                checks.append(Check(f"port {inst.port} is free or ours",
                                    health.port_listeners(inst.port), "port", f"{inst.port}={inst.name}"))
        if inputs.service in ("api", "all") and not inputs.model and plan.api_on(host.name):
            swap, api_files = runtime.api_swap(plan, host, inputs, rel_dir)
            units.append(swap)
            files += api_files
            checks.append(Check(f"port {env.api.port} is free or ours",
                                health.port_listeners(env.api.port), "port",
                                f"{env.api.port}={swap.edge.name}"))
        if not units:
            continue
        out.append(HostPlan(
            host=host, env=env.name, base_dir=base, release_id=inputs.release_id,
            checks=tuple(checks), files=tuple(files), units=tuple(units),
            ready_timeout_s=env.deploy.ready_timeout_s, keep_releases=env.deploy.keep_releases,
            remove_orphans=inputs.service == "all" and not inputs.model, runtime=runtime,
        ))
    return out


def manifest(hp: HostPlan, started: Mapping[str, str], *, who: str, when: str,
             previous: str | None) -> dict:
    """The release manifest: enough to restart every unit of this release (``rollback``).

    ``started`` maps a unit name to the release whose files it uses (this one when it was
    started now, an older one when it was unchanged).
    """
    units = []
    for u in hp.units:
        if isinstance(u, ApiSwap):
            units.append({"name": u.edge.name, "service": "edge", "config_hash": u.edge.config_hash,
                          "start": u.edge.start.render(), "port": u.edge.port,
                          "release": started.get(u.edge.name, hp.release_id)})
            colour_release = next((started[c.name] for c in u.colours.values() if c.name in started),
                                  hp.release_id)
            units.append({"name": f"albert-{hp.env}-api-*", "service": "api",
                          "config_hash": u.config_hash, "release": colour_release,
                          "upstream_file": u.upstream_file,
                          "colours": {k: {"name": c.name, "start": c.start.render(), "port": c.port}
                                      for k, c in u.colours.items()}})
        else:
            units.append({"name": u.name, "service": u.service, "model": u.model_id,
                          "config_hash": u.config_hash, "start": u.start.render(), "port": u.port,
                          "release": started.get(u.name, hp.release_id)})
    return {"format": 1, "release": hp.release_id, "env": hp.env, "host": hp.host.name,
            "created": when, "who": who, "previous": previous, "units": units}


def units_from_manifest(data: Mapping, runtime: Runtime | None = None) -> list[Unit | ApiSwap]:
    """Pure: the units of a recorded release, with their recorded start commands (rollback)."""
    runtime = runtime or DockerRuntime()
    out: list[Unit | ApiSwap] = []
    edge: Unit | None = None
    for u in data.get("units", []):
        if u["service"] == "edge":
            edge = _recorded_unit(u, runtime, None)
            continue
        if u["service"] == "api":
            colours = {k: _recorded_unit({**c, "config_hash": u["config_hash"], "service": "api"},
                                         runtime, health.ReadyCheck(c["port"]))
                       for k, c in u["colours"].items()}
            assert edge is not None, "an api entry follows its edge"
            out.append(ApiSwap(edge=edge, colours=colours, upstream_file=u["upstream_file"],
                               read_upstream=api_cmd.read_upstream(u["upstream_file"])))
            continue
        out.append(_recorded_unit(u, runtime, health.ReadyCheck(u["port"], u.get("model"))))
    return out


def _recorded_unit(u: Mapping, runtime: Runtime, ready: health.ReadyCheck | None) -> Unit:
    return Unit(name=u["name"], service=u["service"], config_hash=u["config_hash"],
                start=Cmd((Raw(u["start"]),)), stop=runtime.stop(u["name"]),
                probe=runtime.probe(u["name"]), logs=runtime.logs(u["name"], 40),
                ready=ready, model_id=u.get("model"), port=u.get("port"))


def orphans(running: Sequence[Mapping[str, str]], hp: HostPlan) -> list[str]:
    """Pure: containers of this env on the host that the plan no longer names."""
    if not hp.remove_orphans:
        return []
    keep = hp.names()
    return sorted(r["name"] for r in running if r["name"] not in keep)


def release_id(now_utc: str, plans_material: object) -> str:
    """``YYYYmmdd-HHMMSS-<hash6>`` from a UTC time ``YYYYmmddTHHMMSS`` and the config."""
    return f"{now_utc.replace('T', '-')}-{config_hash({'m': plans_material})[:6]}"
