"""The container runtime: ``docker run`` per unit, labels for probes, ``--env-file`` for secrets."""

from __future__ import annotations

import json

from pyalbert.commands import api as api_cmd
from pyalbert.commands import docker, health, routes, vllm_cache
from pyalbert.commands.base import Cmd, any_of, combine, group
from pyalbert.commands.vllm import server_args
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
from pyalbert.runtimes.checks import Check, DockerAnswers
from pyalbert.runtimes.edge import edge_unit

MODEL_MOUNT = "/models"


def session_volume(group: RayGroup, host: HostSpec) -> str:
    """The Ray node's session folder (``--temp-dir``), at the same path on the host and in the
    containers that mount it.

    vLLM on the head is a driver of the head's node: ``ray.init`` finds the node's raylet among
    the processes it can see (both containers join the group's :meth:`DockerRuntime.pid_holder`) and
    connects to the raylet's and object store's unix sockets in this folder; without either it
    fails (``No node info found matching attributes``).
    """
    temp = group.temp_dir(host)
    return f"{temp}:{temp}"


def pid_holder_name(group: RayGroup) -> str:
    """The container holding the PID namespace that the head's node and vLLM containers join."""
    return f"{group.unit_name()}-pid"


class DockerRuntime:
    """Containers: ``docker run`` per unit, labels for probes, ``--env-file`` for secrets."""

    name = "docker"

    def vllm_unit(self, inst: VllmInstance, placement: Placement, inputs: DeployInputs,
                  release_dir: str) -> tuple[Unit, list[FileSpec]]:
        env = placement.spec.env
        # a split model's server is a Ray driver: the host's network (Ray's workers call it back)
        split = inst.group is not None
        args = server_args(inst.model_id, inst.model, model_path=f"{MODEL_MOUNT}/{inst.model_id}",
                           port=inst.port, extra_args=env.vllm.extra_args,
                           **({"host": inst.address} if split else {}))
        args += ray_units.vllm_args(inst)
        environ = vllm_cache.with_compile_defaults(vllm_environ(
            env, inst, inputs, {"VLLM_CACHE_ROOT": vllm_cache.IN_CONTAINER, **ray_units.vllm_env(inst)}))
        cache = vllm_cache.docker_tree(env.storage_dir, env.images.vllm)
        head = ray_units.node_cmd(inst.group, inst.host, self.ray_bin(env)).render() if split else None
        holder = self.pid_holder(inst.group, placement, inputs) if split else None
        digest = config_hash({"image": env.images.vllm, "args": args, "port": inst.port,
                              "gpus": list(inst.gpu_ids), "storage": env.storage_dir,
                              "env": hashed_environ(environ), "cache": cache,
                              **({"ray_head": head, "pid": holder.config_hash} if holder else {})})
        file = env_file(release_dir, inst, inputs, environ)
        start = combine(vllm_cache.ensure(cache), docker.run(
            inst.name, env.images.vllm, args, network="host" if split else None,
            # loopback or private: issue 14
            ports=[] if split else [f"{inst.address}:{inst.port}:{inst.port}"],
            volumes=[f"{env.storage_dir}/{inst.model_id}:{MODEL_MOUNT}/{inst.model_id}:ro",
                     f"{cache}:{vllm_cache.IN_CONTAINER}",
                     *([session_volume(inst.group, inst.host)] if split else [])],
            env_file=file.path, gpu_ids=inst.gpu_ids, ipc_host=True,
            pid=f"container:{holder.name}" if holder else None,
            labels=labels(env.name, "vllm", inst.model_id, inputs.release_id, digest),
        ))
        unit = Unit(
            name=inst.name, service="vllm", config_hash=digest, start=start,
            stop=docker.stop(inst.name), probe=docker.inspect_state(inst.name),
            logs=docker.logs(inst.name, 40), ready=vllm_ready(env, inst, inputs),
            model_id=inst.model_id, port=inst.port, files=vllm_auth_files(env, inputs),
            warm_probe=vllm_cache.has_compiled(cache),
        )
        return unit, [file]

    @staticmethod
    def ray_bin(env: EnvironmentSpec) -> str:
        return env.ray.executable or "ray"

    def group_units(self, group: RayGroup, placement: Placement, host: HostSpec,
                    inputs: DeployInputs) -> list[Unit]:
        """The group's units on ``host`` in start order: on the head the PID-namespace holder
        (:meth:`pid_holder`) then the node, on a worker the node."""
        node = self.ray_unit(group, placement, host, inputs)
        return [self.pid_holder(group, placement, inputs), node] if group.is_head(host) else [node]

    def pid_holder(self, group: RayGroup, placement: Placement, inputs: DeployInputs) -> Unit:
        """The head's PID namespace, held by a container of its own that the head's node and vLLM
        containers join. vLLM must see its node's raylet, and ``--pid container:X`` is pinned
        to X's container: joined to the node itself, the server died with a node that crashed
        and docker could not restart it into the restarted node. Its config hash covers only its
        image and command (a new one restarts the node and vLLM: both hash it)."""
        env = placement.spec.env
        name = pid_holder_name(group)
        digest = config_hash({"image": env.images.vllm, "command": list(docker.HOLD),
                              "init": True, "network": "none"})
        start = docker.pid_holder(name, env.images.vllm, labels=labels(
            env.name, "ray-pid", group.model_id, inputs.release_id, digest))
        return Unit(name=name, service="ray-pid", config_hash=digest, start=start,
                    stop=docker.stop(name, 5), probe=docker.inspect_state(name),
                    logs=docker.logs(name, 40), ready=None, model_id=group.model_id)

    def ray_unit(self, group: RayGroup, placement: Placement, host: HostSpec,
                 inputs: DeployInputs) -> Unit:
        """The group's Ray node on ``host``: a container of the vLLM image (the same Ray and vLLM
        everywhere) on the host's network, the weights mounted where the head's vLLM names them,
        its session folder on the host (:func:`session_volume`); the head's in its group's PID
        namespace (:meth:`pid_holder`)."""
        env = placement.spec.env
        name = group.unit_name()
        tokens = [str(t) for t in ray_units.node_cmd(group, host, self.ray_bin(env)).tokens]
        volumes = [f"{env.storage_dir}/{group.model_id}:{MODEL_MOUNT}/{group.model_id}:ro",
                   session_volume(group, host)]
        holder = self.pid_holder(group, placement, inputs) if group.is_head(host) else None
        digest = config_hash({"image": env.images.vllm, "args": tokens, "volumes": volumes,
                              "gpus": host.gpus, "network": "host",
                              **({"pid": holder.config_hash} if holder else {})})
        start = docker.run(name, env.images.vllm, tokens[1:], entrypoint=tokens[0], network="host",
                           volumes=volumes, gpu_ids=tuple(range(host.gpus)), ipc_host=True,
                           pid=f"container:{holder.name}" if holder else None,
                           labels=labels(env.name, "ray", group.model_id, inputs.release_id, digest))
        return Unit(name=name, service="ray", config_hash=digest, start=start,
                    stop=docker.stop(name, 30), probe=docker.inspect_state(name),
                    logs=docker.logs(name, 40),
                    ready=ray_units.cluster_ready(group, ["docker", "exec", name, self.ray_bin(env)]),
                    model_id=group.model_id,
                    port=group.ports.gcs if group.is_head(host) else group.ports.node_manager)

    def api_swap(self, placement: Placement, host: HostSpec, inputs: DeployInputs,
                 release_dir: str) -> tuple[ApiSwap, list[FileSpec]]:
        env = placement.spec.env
        upstream = f"{edge_dir(env)}/upstream"
        api = api_files(env, placement, inputs, release_dir)
        sockets = api_cmd.sockets_dir(edge_dir(env))  # the front door's way in, same path inside
        serve = api_cmd.serve_args(env.name, env.api.port, keys=api.keys,
                                   whitelist=env.whitelist.configured, workers=env.api.workers,
                                   upstream_key=api.upstream_key, host="127.0.0.1",
                                   routes=routes.IN_CONTAINER, uds=sockets)
        digest = config_hash({"image": env.images.api, "args": serve, "port": env.api.port,
                              "network": "host", "files": api.material(release_dir)})
        into = api_cmd.IN_CONTAINER
        volumes = [f"{release_dir}/backends.json:{into}/backends.json:ro",
                   f"{release_dir}/config:{into}/config:ro",
                   f"{routes.routes_dir(env.deploy.base_dir, env.name)}:{routes.IN_CONTAINER}:ro",
                   f"{sockets}:{sockets}"]
        if api.keys:
            volumes.append(f"{release_dir}/keys.json:{into}/keys.json:ro")
        if api.upstream_key:
            volumes.append(f"{release_dir}/upstream.key:{into}/upstream.key:ro")
        if api.whitelist:
            volumes.append(f"{api.whitelist}:{into}/whitelist.json:ro")
        colours = {}
        for colour in api_cmd.COLOURS:
            name = colour_name(env.name, colour)
            spare = api_cmd.spare_port(env.api.port, colour)
            # the host's network: the gateway reaches servers bound to the host's loopback
            args = api_cmd.serve_args(env.name, spare, keys=api.keys,
                                      whitelist=env.whitelist.configured, workers=env.api.workers,
                                      upstream_key=api.upstream_key, host="127.0.0.1",
                                      routes=routes.IN_CONTAINER,
                                      uds=api_cmd.socket_path(edge_dir(env), colour))
            # made by the deploy user before docker would make a missing one root's
            start = combine(Cmd.of("mkdir", "-p", sockets), docker.run(
                name, env.images.api, args[1:], entrypoint=args[0], network="host", volumes=volumes,
                user=docker.AS_DEPLOY_USER,
                labels=labels(env.name, "api", colour, inputs.release_id, digest),
            ))
            colours[colour] = Unit(
                name=name, service="api", config_hash=digest, start=start,
                stop=docker.stop(name), probe=docker.inspect_state(name),
                logs=docker.logs(name, 40), ready=health.ReadyCheck(spare), port=spare,
            )
        edge, edge_files, checks = edge_unit(env, self.name, inputs, release_dir)
        swap = ApiSwap(edge=edge, colours=colours, upstream_file=upstream,
                       read_upstream=api_cmd.read_upstream(upstream), checks=tuple(checks))
        return swap, [*api.files, *edge_files]

    def probe(self, name: str) -> Cmd:
        return docker.inspect_state(name)

    def list_units(self, env: str) -> Cmd:
        """The containers (``docker ps``), then how each was restarted (a crash loop shows)."""
        return combine(docker.ps(env), group(docker.restarts_of(env)))

    def parse_units(self, stdout: str) -> list[dict[str, str]]:
        rows = []
        restarts = docker.parse_restarts_of(stdout)
        for line in stdout.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "Names" not in row:
                continue  # a restarts line
            labels = dict(kv.split("=", 1) for kv in row.get("Labels", "").split(",") if "=" in kv)
            rows.append({"name": row.get("Names", ""), "image": row.get("Image", ""),
                         "state": row.get("State", ""), "status": row.get("Status", ""),
                         "ports": row.get("Ports", ""), "service": labels.get("albert.service", ""),
                         "model": labels.get("albert.model", ""),
                         "release": labels.get("albert.release", ""),
                         "config_hash": labels.get("albert.config-hash", ""),
                         "restart_times": restarts.get(row.get("Names", ""), [])})
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
        return [DockerAnswers()]

    def purge_cache(self, env: EnvironmentSpec) -> Cmd:
        """Empty vLLM's compile cache (root's files: from a throwaway container of the image)."""
        storage, image = env.storage_dir, env.images.vllm
        return any_of(Cmd.of("test", "!", "-e", vllm_cache.root(storage)),
                      vllm_cache.purge_in_container(storage, image))
