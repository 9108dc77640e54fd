"""What every runtime builds and shares: units as data, the ``Runtime`` seam, and the unit material
both runtimes derive the same way (HF token env, secret digests, api files, colour/edge names).

A :class:`Unit` carries the commands to start, stop, probe and read logs of one long-running
server, its readiness check and its config hash; the engine only runs these commands, so a runtime
(containers, supervised processes) plugs in by providing the :class:`Runtime` builders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pyalbert.commands import edge as edge_cmd
from pyalbert.commands import health, release, routes
from pyalbert.commands.base import Cmd
from pyalbert.commands.ray import ClusterReady
from pyalbert.commands.render import render
from pyalbert.commands.setup import SetupPaths
from pyalbert.config.environment import EnvironmentSpec, HostSpec
from pyalbert.config.groups import RayGroup
from pyalbert.config.placement import Placement, VllmInstance
from pyalbert.errors import AlbertError

if TYPE_CHECKING:
    from pyalbert.runtimes.checks import Check
    from pyalbert.runtimes.slots import VllmSlots

ServiceName = Literal["vllm", "api", "edge", "prometheus", "ray", "ray-pid"]


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
class Reload:
    """Files a running unit re-reads in place (Prometheus): when only they change, the engine
    points the unit at this release's files and reloads it instead of restarting it."""

    #: of the files this release gives the unit
    digest: str
    #: prints the digest of the files the unit reads now
    probe: Cmd
    #: point the unit at this release's files and reload it (fails when it refuses them)
    apply: Cmd


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
    #: a server's HTTP readiness, or a Ray node's (``ray status`` lists the whole group)
    ready: health.ReadyCheck | ClusterReady | None
    model_id: str | None = None
    port: int | None = None
    #: files written (before start) into the unit's own place (not the release dir), e.g. the edge
    files: tuple[FileSpec, ...] = ()
    #: vLLM: probe before start, does its compile cache hold compiled artefacts (a warm start)
    warm_probe: Cmd | None = None
    #: vLLM: its spare slot and gateway route (a replace without downtime)
    slots: VllmSlots | None = None
    #: files it reloads in place; its config hash then covers only its own command and image
    reload: Reload | None = None
    #: a restart in place in one command (its heavy checks in ``prepare``, run before while the
    #: old server still serves): stops what runs under the name and starts this; None: stop+start
    replace: Cmd | None = None
    prepare: Cmd | None = None


@dataclass(frozen=True)
class ApiSwap:
    """The api: two colours on spare ports behind the edge (HAProxy, :mod:`pyalbert.runtimes.edge`);
    deploy starts the idle colour, then switches HAProxy to it through its runtime API."""

    edge: Unit
    colours: Mapping[str, Unit]  # "blue"/"green" -> unit on its spare port
    upstream_file: str
    read_upstream: Cmd
    #: the edge's preflight (``haproxy -c`` of its files)
    checks: tuple[Check, ...] = ()

    @property
    def config_hash(self) -> str:
        return next(iter(self.colours.values())).config_hash

    def switch(self, colour: str) -> Cmd:
        """New requests to ``colour`` at once, the other drains (its requests in flight finish)."""
        folder = self.upstream_file.rsplit("/", 1)[0]  # the edge's folder: socket, servers' state
        return edge_cmd.switch(f"{folder}/haproxy.sock", f"{folder}/servers.state", self.upstream_file,
                               colour, self.colours[colour].port or 0,
                               tuple(k for k in self.colours if k != colour))


@dataclass(frozen=True)
class DeployInputs:
    """What a deploy needs beyond the config, resolved by the entry point (no I/O in builders)."""

    release_id: str
    #: secret name (``hf_token``, ``api_keys``) -> value
    secrets: Mapping[str, str] = field(default_factory=dict)
    #: files of the config folder the api container needs: relative path -> text
    config_files: Mapping[str, str] = field(default_factory=dict)
    service: Literal["vllm", "api", "all"] = "all"
    model: str | None = None


# --- the runtime seam --------------------------------------------------------------------------


class Runtime(Protocol):
    """Builders one runtime provides; the engine never names docker or the supervisor itself."""

    name: str

    def vllm_unit(self, inst: VllmInstance, placement: Placement, inputs: DeployInputs,
                  release_dir: str) -> tuple[Unit, list[FileSpec]]: ...

    def api_swap(self, placement: Placement, host: HostSpec, inputs: DeployInputs,
                 release_dir: str) -> tuple[ApiSwap, list[FileSpec]]: ...

    def ray_unit(self, group: RayGroup, placement: Placement, host: HostSpec,
                 inputs: DeployInputs) -> Unit: ...

    #: the group's units on ``host`` in start order (its Ray node, after what the node needs)
    def group_units(self, group: RayGroup, placement: Placement, host: HostSpec,
                    inputs: DeployInputs) -> list[Unit]: ...

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

    def purge_cache(self, env: EnvironmentSpec) -> Cmd: ...


# --- unit material both runtimes build the same way -------------------------------------------


def labels(env: str, service: str, model: str | None, release_id: str, digest: str) -> dict[str, str]:
    """What a probe reads back from a running unit (container labels, supervisor labels)."""
    return {"albert.env": env, "albert.service": service, "albert.model": model or "",
            "albert.release": release_id, "albert.config-hash": digest}


def colour_name(env: str, colour: str) -> str:
    return f"albert-{env}-api-{colour}"


def edge_name(env: str) -> str:
    return f"albert-{env}-api"


def edge_dir(env: EnvironmentSpec) -> str:
    return f"{env.deploy.base_dir}/edge-{env.name}"


def env_lines(env: Mapping[str, str], unit: str) -> list[tuple[str, str]]:
    for key, value in env.items():
        if "\n" in value or "\r" in value:
            raise AlbertError(f"the environment of {unit} has a value with a line break in {key}. "
                              "Fix: use a single-line value (env files hold one variable a line).")
    return sorted(env.items())


def vllm_environ(env: EnvironmentSpec, inst: VllmInstance, inputs: DeployInputs,
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``[vllm] env``, the model's ``env``, ``extra``, the HF token."""
    environ = {**env.vllm.env, **inst.model.env, **(extra or {})}
    hf = inputs.secrets.get("hf_token")
    if hf:
        environ |= {"HF_TOKEN": hf, "HUGGING_FACE_HUB_TOKEN": hf}
    key = inputs.secrets.get("vllm_api_key")
    if key:
        # vLLM reads its --api-key from $VLLM_API_KEY: the env file (0600), never argv (ps)
        environ["VLLM_API_KEY"] = key
    return environ


SECRET_ENV = ("HF_", "HUGGING", "VLLM_API_KEY")


def hashed_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a config hash: the secrets' digests instead of the secrets."""
    return {k: (secret_digest(v) if k.startswith(SECRET_ENV) else v) for k, v in environ.items()}


def vllm_auth_header(env: EnvironmentSpec) -> str:
    """Where the host keeps the servers' key as a curl header file (``curl -H @FILE``): readiness
    and ``albert smoke vllm`` read it there, so the key is on no command line."""
    return f"{env.deploy.base_dir}/auth-{env.name}/vllm.header"


def vllm_auth_files(env: EnvironmentSpec, inputs: DeployInputs) -> tuple[FileSpec, ...]:
    key = inputs.secrets.get("vllm_api_key")
    if not key:
        return ()
    return (FileSpec(vllm_auth_header(env), f"Authorization: Bearer {key}\n", secret=True),)


def vllm_ready(env: EnvironmentSpec, inst: VllmInstance, inputs: DeployInputs) -> health.ReadyCheck:
    """Readiness of one server, asked where it listens, with its key when it has one."""
    header = vllm_auth_header(env) if inputs.secrets.get("vllm_api_key") else None
    return health.ReadyCheck(inst.port, inst.model_id, host=inst.address, header_file=header)


def env_file(release_dir: str, inst: VllmInstance, inputs: DeployInputs,
             environ: Mapping[str, str]) -> FileSpec:
    """The server's 0600 env file in the release dir (secrets never on a command line)."""
    text = render("unit.env.j2", unit=inst.name, release=inputs.release_id,
                  env=env_lines(environ, inst.name))
    return FileSpec(f"{release_dir}/{inst.name}.env", text, secret=True)


@dataclass(frozen=True)
class ApiFiles:
    """The api's files in the release dir, and what its command line needs to know of them."""

    files: list[FileSpec]
    keys: bool
    #: where the setup stage builds the whitelist on the host (``create_whitelist --output``)
    whitelist: str | None
    #: ``upstream.key``: the model servers' key the gateway sends them
    upstream_key: bool = False

    def material(self, release_dir: str) -> dict[str, str]:
        """The files for a config hash (secret ones as digests), independent of the release dir."""
        return {f.path.removeprefix(release_dir): (secret_digest(f.content) if f.secret else f.content)
                for f in self.files}


def api_files(env: EnvironmentSpec, placement: Placement, inputs: DeployInputs,
              release_dir: str) -> ApiFiles:
    files = [FileSpec(f"{release_dir}/backends.json",
                      render("backends.json.j2", backends=dict(placement.backends)))]
    keys = inputs.secrets.get("api_keys")
    if keys:
        files.append(FileSpec(f"{release_dir}/keys.json", keys, secret=True))
    upstream_key = inputs.secrets.get("vllm_api_key")
    if upstream_key:
        files.append(FileSpec(f"{release_dir}/upstream.key", upstream_key + "\n", secret=True))
    for rel, text in sorted(inputs.config_files.items()):
        files.append(FileSpec(f"{release_dir}/config/{rel}", text))
    # the routes folder the gateway watches (a replace without downtime): made before it starts
    files.append(FileSpec(f"{routes.routes_dir(env.deploy.base_dir, env.name)}/README",
                          routes.README))
    whitelist = SetupPaths(env.deploy.base_dir).whitelist if env.whitelist.configured else None
    return ApiFiles(files, bool(keys), whitelist, bool(upstream_key))
