"""The remote setup stage: a tools venv on the host, the config folder, then ``albert
download_models`` and ``albert create_whitelist`` run there.

Layout under ``deploy.base_dir`` (``B``)::

    B/tools/              venv with this repo's wheel (B/tools/.albert-wheel-sha256: its content hash)
    B/tools/wheelhouse/   the wheel and its dependencies, uploaded (hosts need no index)
    B/config/             the config folder (B/config/.albert-config-sha256)
    B/shared/whitelist.json

``HF_TOKEN`` reaches ``download_models`` on stdin (read into the environment by the shell), never
in argv or in the displayed command.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pyalbert.commands.base import Cmd, Secret, combine

WHEEL_STAMP = ".albert-wheel-sha256"
#: the tools venv also runs the api process (venv runtime) and the supervisor
TOOLS_EXTRAS = "api"
CONFIG_STAMP = ".albert-config-sha256"
#: variables passed from the deploy machine to download_models on the host (not secrets)
HUB_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_HUB_ENABLE_HF_TRANSFER")


@dataclass(frozen=True)
class SetupPaths:
    base_dir: str

    @property
    def tools(self) -> str:
        return f"{self.base_dir}/tools"

    @property
    def wheelhouse(self) -> str:
        return f"{self.tools}/wheelhouse"

    @property
    def albert(self) -> str:
        return f"{self.tools}/bin/albert"

    @property
    def config(self) -> str:
        return f"{self.base_dir}/config"

    @property
    def shared(self) -> str:
        return f"{self.base_dir}/shared"

    @property
    def whitelist(self) -> str:
        return f"{self.shared}/whitelist.json"


# --- the probe: one round trip tells what the host has -----------------------------------------


def probe(paths: SetupPaths, python: str = "python3") -> Cmd:
    """Prints ``python=<ver> <machine> <glibc>``, ``wheel=<sha|->``, ``config=<sha|->`` and one
    ``have=<file>`` per file in the wheelhouse."""
    q = shlex.quote
    pyinfo = ('import sys, platform; print("python=%d%d" % sys.version_info[:2], platform.machine(),'
              ' platform.libc_ver()[1] or "-")')
    script = "; ".join([
        f"{q(python)} -c {q(pyinfo)} 2>/dev/null || echo python=-",
        f"printf 'wheel=%s\\n' \"$(cat {q(paths.tools + '/' + WHEEL_STAMP)} 2>/dev/null || echo -)\"",
        f"printf 'config=%s\\n' \"$(cat {q(paths.config + '/' + CONFIG_STAMP)} 2>/dev/null || echo -)\"",
        f"ls -1 {q(paths.wheelhouse)} 2>/dev/null | sed 's/^/have=/'",
        "true",
    ])
    return Cmd.of("sh", "-c", script)


@dataclass(frozen=True)
class HostState:
    python: str | None  # "310", or None when the interpreter is missing
    machine: str = ""
    glibc: str = ""
    wheel: str | None = None
    config: str | None = None
    wheelhouse: frozenset[str] = field(default_factory=frozenset)


def parse_probe(stdout: str) -> HostState:
    values: dict[str, str] = {}
    have: set[str] = set()
    for line in stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "have":
            have.add(value)
        elif key in ("python", "wheel", "config"):
            values[key] = value.strip()
    py = values.get("python", "-").split()
    none = {"-", ""}
    return HostState(
        python=None if not py or py[0] in none else py[0],
        machine=py[1] if len(py) > 1 else "",
        glibc="" if len(py) < 3 or py[2] in none else py[2],
        wheel=None if values.get("wheel", "-") in none else values["wheel"],
        config=None if values.get("config", "-") in none else values["config"],
        wheelhouse=frozenset(have),
    )


# --- changes -----------------------------------------------------------------------------------


def prepare_dirs(paths: SetupPaths) -> Cmd:
    return Cmd.of("mkdir", "-p", paths.wheelhouse, paths.config, paths.shared)


def install_tools(paths: SetupPaths, wheel_name: str, digest: str, python: str = "python3") -> Cmd:
    """Create the venv if missing, install the wheel with its dependencies from the uploaded
    wheelhouse (no index), force-reinstall the wheel itself, record its hash.

    Under ``flock``: two setup jobs of one pipeline (vllm and api) may install at once."""
    wheel = f"{paths.wheelhouse}/{wheel_name}"
    pip = [f"{paths.tools}/bin/pip", "install", "-q", "--no-index", "--disable-pip-version-check"]
    return Cmd.of(
        "flock", f"{paths.base_dir}/.tools.lock", "sh", "-c",
        " && ".join([
            f"{{ test -x {shlex.quote(paths.tools + '/bin/python')} || "
            f"{shlex.quote(python)} -m venv {shlex.quote(paths.tools)}; }}",
            shlex.join([*pip, "--find-links", paths.wheelhouse, f"{wheel}[{TOOLS_EXTRAS}]"]),
            shlex.join([*pip, "--no-deps", "--force-reinstall", wheel]),
            f"echo {shlex.quote(digest)} > {shlex.quote(paths.tools + '/' + WHEEL_STAMP)}",
        ]),
    )


def prune_wheelhouse(paths: SetupPaths, keep: set[str] | frozenset[str], have: frozenset[str]) -> Cmd | None:
    """Remove wheels of older builds (none: nothing to remove)."""
    stale = sorted(have - set(keep))
    if not stale:
        return None
    return Cmd.of("rm", "-f", [f"{paths.wheelhouse}/{name}" for name in stale])


def unpack_config(paths: SetupPaths, archive: str, digest: str) -> Cmd:
    """Replace ``B/config`` with the uploaded archive's content, then record its hash."""
    new = f"{paths.config}.new"
    return combine(
        Cmd.of("rm", "-rf", new),
        Cmd.of("mkdir", "-p", new),
        Cmd.of("tar", "-xzf", archive, "-C", new),
        Cmd.of("sh", "-c", f"echo {shlex.quote(digest)} > {shlex.quote(new + '/' + CONFIG_STAMP)}"),
        Cmd.of("rm", "-rf", paths.config),
        Cmd.of("mv", new, paths.config),
        Cmd.of("rm", "-f", archive),
    )


def _env_prefix(hub_env: Mapping[str, str]) -> list[str]:
    pairs = [f"{k}={hub_env[k]}" for k in HUB_ENV if hub_env.get(k)]
    return ["env", *pairs] if pairs else []


def download_models(paths: SetupPaths, env: str, storage_dir: str, *, models: Sequence[str] = (),
                    hf_token: str | None = None, hub_env: Mapping[str, str] | None = None) -> Cmd:
    """``albert download_models`` on the host (only ``models`` when given); ``HF_TOKEN`` on stdin."""
    argv = [*_env_prefix(hub_env or {}), paths.albert, "download_models", "--env", env,
            "--config-dir", paths.config, "--storage-dir", storage_dir]
    for model in models:
        argv += ["--model", model]
    if not hf_token:
        return Cmd.of(argv)
    script = f"IFS= read -r HF_TOKEN && export HF_TOKEN && exec {shlex.join(argv)}"
    return Cmd.of("sh", "-c", script, stdin=Secret(hf_token + "\n"))


def create_whitelist(paths: SetupPaths, env: str) -> Cmd:
    return Cmd.of(paths.albert, "create_whitelist", "--env", env, "--config-dir", paths.config,
                  "--output", paths.whitelist)
