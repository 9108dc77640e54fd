"""Docker builders: one container per unit, labelled so probes find it again.

Pure: every function returns a :class:`Cmd`. The deployer runs them; tests compare whole strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from pyalbert.commands.base import Cmd, Op, Raw, any_of, combine, group, pipe

#: labels every container of ours carries (``albert.<key>``)
LABELS = ("env", "service", "model", "release", "config-hash")
HASH_LABEL = "albert.config-hash"


def gpus_flag(gpu_ids: Sequence[int]) -> list[str]:
    """``--gpus '"device=0,1"'`` (the inner quotes are docker's syntax for a list)."""
    if not gpu_ids:
        return []
    return ["--gpus", '"device=' + ",".join(str(g) for g in gpu_ids) + '"']


#: run as the deploy user (who owns the release files mounted in, some of them 0600)
AS_DEPLOY_USER = Raw('"$(id -u):$(id -g)"')


def run(
    name: str,
    image: str,
    command: Sequence[str] = (),
    *,
    ports: Sequence[str] = (),
    volumes: Sequence[str] = (),
    env_file: str | None = None,
    gpu_ids: Sequence[int] = (),
    labels: Mapping[str, str] | None = None,
    restart: str = "unless-stopped",
    ipc_host: bool = False,
    network: str | None = None,
    entrypoint: str | None = None,
    user: str | Raw | None = None,
    pid: str | None = None,
    init: bool = False,
) -> Cmd:
    """``docker run -d --name NAME ...``: secrets only through ``--env-file`` (never ``-e``).

    ``pid``: ``--pid`` (``container:OTHER``: see OTHER's processes, as a Ray driver must);
    ``init``: docker's init (tini) is the container's PID 1, reaping the zombies of its namespace."""
    return Cmd.of(
        "docker", "run", "-d", "--name", name,
        ("--restart", restart) if restart else None,
        "--init" if init else None,
        "--ipc=host" if ipc_host else None,
        ("--network", network) if network else None,
        ("--pid", pid) if pid else None,
        [("-p", p) for p in ports],
        [("-v", v) for v in volumes],
        gpus_flag(gpu_ids),
        ("--env-file", env_file) if env_file else None,
        [("--label", f"{k}={v}") for k, v in (labels or {}).items()],
        ("--entrypoint", entrypoint) if entrypoint else None,
        ("--user", user) if user else None,
        image,
        list(command),
    )


#: what a PID-namespace holder runs: nothing, for ever (coreutils' sleep: in every vLLM image)
HOLD = ("sleep", "infinity")


def pid_holder(name: str, image: str, *, labels: Mapping[str, str] | None = None) -> Cmd:
    """A container that only holds a PID namespace for others to join (``--pid container:NAME``),
    as a Kubernetes pod's pause container: docker's init as PID 1 (it reaps what the joiners
    orphan) running :data:`HOLD`, no network, restarted like every unit. Joined containers keep
    the namespace when one of them dies, so docker can restart that one into it."""
    return run(name, image, HOLD[1:], entrypoint=HOLD[0], network="none", init=True,
               labels=labels)


def kill_signal(name: str, sig: str = "HUP") -> Cmd:
    """Send a signal to a container's main process (``HUP``: the api reloads keys and whitelist)."""
    return Cmd.of("docker", "kill", "--signal", sig, name)


def stop(name: str, timeout_s: int = 30) -> Cmd:
    """Stop gracefully (SIGTERM, then SIGKILL after ``timeout_s``) and remove; fine if absent."""
    quiet = [Op(">/dev/null"), Op("2>&1")]
    return any_of(
        group(combine(
            Cmd.of("docker", "stop", "-t", timeout_s, name, quiet),
            Cmd.of("docker", "rm", "-f", name, quiet),
        )),
        remove(name),
    )


def remove(name: str) -> Cmd:
    """``docker rm -f NAME`` that succeeds when there is nothing to remove."""
    return any_of(Cmd.of("docker", "rm", "-f", name, Op(">/dev/null"), Op("2>&1")), Cmd.of("true"))


def inspect_state(name: str) -> Cmd:
    """Probe: ``<running> <config hash> <release>`` of a container; exit 1 when absent."""
    fmt = ('{{.State.Running}} {{index .Config.Labels "albert.config-hash"}} '
           '{{index .Config.Labels "albert.release"}}')
    return Cmd.of("docker", "inspect", "--format", fmt, name)


def parse_state(stdout: str) -> tuple[bool, str, str]:
    """``(running, config hash, release)`` from :func:`inspect_state` output."""
    parts = stdout.split()
    running = bool(parts) and parts[0] == "true"
    config_hash = parts[1] if len(parts) > 1 and parts[1] != "<no" else ""
    release = parts[2] if len(parts) > 2 and not parts[2].startswith("value>") else ""
    return running, config_hash, release


def ps(env: str, service: str | None = None) -> Cmd:
    """Containers of an environment (all states), one JSON object a line."""
    return Cmd.of(
        "docker", "ps", "-a", "--no-trunc", "--filter", f"label=albert.env={env}",
        ("--filter", f"label=albert.service={service}") if service else None,
        "--format", "{{json .}}",
    )


#: one JSON object a container: its name, restarts by its restart policy (since its last start by
#: hand), when it last started and when it was created (docker's RFC 3339 times)
RESTARTS_FORMAT = ('{"Name": {{json .Name}}, "RestartCount": {{.RestartCount}}, '
                   '"StartedAt": {{json .State.StartedAt}}, "Created": {{json .Created}}}')


def restarts_of(env: str) -> Cmd:
    """Probe: how each container of an environment was restarted (``docker ps`` does not say):
    one :data:`RESTARTS_FORMAT` line a container; a container removed meanwhile is skipped."""
    ids = Cmd.of("docker", "ps", "-aq", "--no-trunc", "--filter", f"label=albert.env={env}")
    inspect = Cmd.of("xargs", "-r", "docker", "inspect", "--format", RESTARTS_FORMAT, Op("2>/dev/null"))
    return any_of(pipe(ids, inspect), Cmd.of("true"))


def _epoch(stamp: str) -> float | None:
    """Seconds since the epoch of a docker time (nanoseconds, ``Z``); None for its zero time."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    digits = "".join(c for c in frac if c.isdigit())
    offset = frac[len(digits):] or "+00:00"
    try:
        when = datetime.fromisoformat(f"{head}.{(digits or '0')[:6]:0<6}{offset}")
    except ValueError:
        return None
    return when.timestamp() if when.year > 1 else None


def parse_restarts_of(stdout: str) -> dict[str, list[float]]:
    """Container name -> when it was restarted (epoch s, oldest first) from :func:`restarts_of`.

    Docker keeps the count and the last start only: the last restart is dated by ``StartedAt``,
    the earlier ones by the container's creation (they came after it: a lower bound, so a
    "restarts in the last minutes" count never counts too many)."""
    out: dict[str, list[float]] = {}
    for line in stdout.splitlines():
        try:
            row = json.loads(line)
            count = int(row["RestartCount"])
        except (ValueError, KeyError, TypeError):
            continue
        started, created = _epoch(str(row.get("StartedAt", ""))), _epoch(str(row.get("Created", "")))
        if count <= 0 or started is None:
            out[str(row.get("Name", "")).lstrip("/")] = []
            continue
        out[str(row.get("Name", "")).lstrip("/")] = [created or started] * (count - 1) + [started]
    return out


def logs(name: str, tail: int = 100, *, follow: bool = False) -> Cmd:
    return Cmd.of("docker", "logs", "--tail", tail, "-f" if follow else None, name, Op("2>&1"))


def server_version() -> Cmd:
    """Probe: the daemon answers (exit 0 and its version)."""
    return Cmd.of("docker", "version", "--format", "{{.Server.Version}}")


def image_exists(image: str) -> Cmd:
    return Cmd.of("docker", "image", "inspect", "--format", "{{.Id}}", image, Op(">/dev/null"))


def pull(image: str) -> Cmd:
    return Cmd.of("docker", "pull", "-q", image)


def ensure_image(image: str) -> Cmd:
    """Pull only when the image is not on the host already (check, then act)."""
    return any_of(image_exists(image), pull(image))


def published_by(port: int) -> Cmd:
    """Probe: names of the containers publishing host port ``port`` (empty: none)."""
    return Cmd.of("docker", "ps", "--filter", f"publish={port}", "--format", "{{.Names}}")
