"""The setup stage on the hosts (``fab setup``): download models and build the whitelist there,
with the tools of this repo installed on each host.

Per host, in parallel: one probe (python, installed wheel hash, config hash, wheelhouse), then
only what changed: upload the wheel and its dependencies (built here, for the host's python, so
hosts need no package index), (re)install the tools venv when the wheel's content hash changed,
upload the config folder when its hash changed; then ``albert download_models`` on hosts that
serve vllm (their models only; it checks installed models from their manifests) and ``albert
create_whitelist`` on hosts that serve the api. ``HF_TOKEN`` goes on stdin. ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` set here are passed on (a hub mirror for air-gapped hosts).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from pyalbert.commands import setup as cmds
from pyalbert.commands.base import Cmd
from pyalbert.config.deployment import resolved
from pyalbert.config.spec import DeploymentSpec
from pyalbert.engine.fanout import HostOutcome, RunnerFactory, fan_out, ssh_runners
from pyalbert.errors import AlbertError
from pyalbert.remote import DryRunner, Runner
from pyalbert.runtimes import facts, runtime_for
from pyalbert.ui import console

REPO = Path(__file__).resolve().parents[2]
_lock = threading.Lock()


# --- artifacts built here ----------------------------------------------------------------------


def content_digest(entries: dict[str, bytes]) -> str:
    """sha256 over sorted (name, content): stable across rebuilds (zip/tar timestamps ignored)."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    return digest.hexdigest()


def wheel_digest(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return content_digest({n: zf.read(n) for n in zf.namelist() if not n.endswith("/RECORD")})


@functools.lru_cache(maxsize=1)
def build_wheel() -> tuple[Path, str]:
    """This repo's wheel (built once per process) and its content hash.

    ``$ALBERT_TOOLS_WHEEL`` names a wheel built earlier (a CI artifact) to use instead.
    """
    given = os.environ.get("ALBERT_TOOLS_WHEEL")
    if given:
        path = Path(given)
        if not path.is_file() or path.suffix != ".whl":
            raise AlbertError(f"$ALBERT_TOOLS_WHEEL={given} is not a wheel file. Fix: point it at "
                              f"a pyalbert-*.whl, or unset it to build one from {REPO}.")
        return path, wheel_digest(path)
    work = Path(tempfile.mkdtemp(prefix="albert-wheel-"))
    src, out = work / "src", work / "dist"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("pyalbert", "ci"):
        if (REPO / package).is_dir():
            shutil.copytree(REPO / package, src / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600)
    wheels = sorted(out.glob("pyalbert-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AlbertError(f"cannot build the pyalbert wheel from {REPO}: {proc.stderr.strip()[-600:]}")
    return wheels[0], wheel_digest(wheels[0])


def cache_dir() -> Path:
    """Where built artifacts are kept between runs (``$ALBERT_CACHE_DIR``, read when asked)."""
    return Path(os.environ.get("ALBERT_CACHE_DIR", Path.home() / ".cache" / "albert"))


def platform_tags(machine: str, glibc: str) -> list[str]:
    """``--platform`` values pip may pick for a host: manylinux up to its glibc."""
    try:
        major, minor = (int(x) for x in glibc.split(".")[:2])
    except ValueError:
        major, minor = 2, 17
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(17, minor + 1)] if major == 2 else []
    return [*tags, f"manylinux2014_{machine}", f"linux_{machine}"]


def wheelhouse(wheel: Path, python: str, machine: str, glibc: str) -> Path:
    """The wheel's dependencies as wheels for the host's python/platform (cached here)."""
    key = hashlib.sha256(f"{wheel_requires(wheel)}|{cmds.TOOLS_EXTRAS}|{python}|{machine}|{glibc}"
                         .encode()).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / f"cp{python}-{machine}-{key}"
    with _lock:
        if not (folder / ".complete").exists():
            folder.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    "-d", str(folder)]
            for tag in platform_tags(machine, glibc):
                argv += ["--platform", tag]
            target = f"pyalbert[{cmds.TOOLS_EXTRAS}] @ {wheel.resolve().as_uri()}"
            proc = subprocess.run([*argv, target], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise AlbertError(
                    f"cannot download the tools' dependencies for python {python} on {machine} "
                    f"(pip download): {proc.stderr.strip()[-600:]}. Fix: check access to the "
                    f"package index from this machine (PIP_INDEX_URL).")
            (folder / ".complete").touch()
    return folder


def dependency_wheels(house: Path) -> list[Path]:
    """The wheelhouse's wheels but pyalbert's own: ``pip download`` copies the wheel it was given
    (of whatever build filled the cache) beside its dependencies; the current build ships apart."""
    return sorted(p for p in house.glob("*.whl") if not p.name.startswith("pyalbert-"))


def wheel_requires(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    return "\n".join(sorted(line for line in lines if line.startswith("Requires-Dist:")))


def config_archive(config_dir: Path) -> tuple[bytes, str]:
    """A reproducible .tar.gz of the config folder and its content hash."""
    entries: dict[str, bytes] = {}
    for path in sorted(config_dir.rglob("*")):
        rel = path.relative_to(config_dir).as_posix()
        if path.is_file() and "__pycache__" not in rel and not rel.startswith(".albert-"):
            entries[rel] = path.read_bytes()
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(entries[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(entries[name]))
    return raw.getvalue(), content_digest(entries)


# --- one host ----------------------------------------------------------------------------------


@dataclass
class SetupReport:
    changed: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = ", ".join(self.changed) if self.changed else "tools and config unchanged"
        return f"{what}; ran {', '.join(self.ran) or 'nothing'}"


def say(host: str, text: str) -> None:
    console.print(f"[bold]\\[{host}][/] {escape(text)}", soft_wrap=True, highlight=False)


def setup_host(runner: Runner, spec, *, env_name: str, config_dir: Path, services: set[str],
               models: list[str], hf_token: str | None, hub_env: dict[str, str],
               dry_run: bool = False) -> SetupReport:
    """Probe the host, then change only what differs. Changes go through ``apply``: the host's
    runner, or with ``dry_run`` a recorder whose commands are printed (one sequence, two modes)."""
    name = runner.label
    paths = cmds.SetupPaths(spec.env.deploy.base_dir)
    report = SetupReport()
    state = cmds.parse_probe(runner.run(cmds.probe(paths)).stdout)
    if state.python is None:
        raise AlbertError(f"host {name} has no python3. Fix: run `fab provision --env {env_name}`.")
    apply: Runner = DryRunner(name) if dry_run else runner
    would = "would be " if dry_run else ""
    if state.wheel != (wheel := build_wheel())[1]:
        uploaded = _install_tools(apply, paths, state, *wheel)
        report.changed.append(f"tools venv {would}installed ({wheel[0].name}, {uploaded} wheel(s) "
                              "uploaded)")
    archive, config_digest = config_archive(config_dir)
    if state.config != config_digest:
        _upload_config(apply, paths, archive, config_digest)
        report.changed.append(f"config {would}uploaded")
    whitelist_before = _digest(runner, paths.whitelist) if "api" in services else ""
    for label, cmd in _stage_commands(spec, paths, env_name, services, models, hf_token, hub_env):
        result = apply.run(cmd, timeout=6 * 3600)
        for line in result.stdout.strip().splitlines()[-6:]:
            say(name, f"{label}: {line}")
        if result.known:
            report.ran.append(label)
    if "api" in services and _digest(runner, paths.whitelist) != whitelist_before:
        reloaded = reload_api(apply, spec)
        if reloaded:
            report.changed.append(f"whitelist changed: api reloaded ({', '.join(reloaded)})")
    if isinstance(apply, DryRunner):
        for cmd in apply.commands:
            say(name, f"would run: {cmd.display()}")
    return report


def _install_tools(apply: Runner, paths, state, wheel: Path, digest: str) -> int:
    """Upload the missing wheels, (re)install the tools venv; the number of wheels uploaded."""
    house = wheelhouse(wheel, state.python, state.machine, state.glibc)
    files = {p.name: p for p in dependency_wheels(house)} | {wheel.name: wheel}
    # a new build keeps its version's file name: the host's copy of it is stale, upload it again
    missing = sorted((set(files) - state.wheelhouse) | {wheel.name})
    apply.run(cmds.prepare_dirs(paths))
    for fname in missing:
        apply.put(str(files[fname]), f"{paths.wheelhouse}/{fname}")
    apply.run(cmds.install_tools(paths, wheel.name, digest), timeout=1800)
    prune = cmds.prune_wheelhouse(paths, set(files), state.wheelhouse)
    if prune:
        apply.run(prune)
    return len(missing)


def _upload_config(apply: Runner, paths, archive: bytes, digest: str) -> None:
    remote_archive = f"{paths.base_dir}/config.upload.tar.gz"
    apply.run(cmds.prepare_dirs(paths))
    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
        tmp.write(archive)
        tmp.flush()
        apply.put(tmp.name, remote_archive)
    apply.run(cmds.unpack_config(paths, remote_archive, digest))


def _stage_commands(spec, paths, env_name: str, services: set[str], models: list[str],
                    hf_token: str | None, hub_env: dict[str, str]) -> list[tuple[str, Cmd]]:
    steps: list[tuple[str, Cmd]] = []
    if "vllm" in services and models:
        steps.append(("download_models", cmds.download_models(
            paths, env_name, spec.env.storage_dir, models=models, hf_token=hf_token,
            hub_env=hub_env)))
    if "api" in services:
        steps.append(("create_whitelist", cmds.create_whitelist(paths, env_name)))
    return steps


def _digest(runner: Runner, path: str) -> str:
    return runner.run(Cmd.of("sha256sum", path), check=False).stdout.split(" ")[0]


def reload_api(runner, spec: DeploymentSpec) -> list[str]:
    """SIGHUP the running api processes of ``spec`` on this host: they re-read keys and whitelist
    (a new whitelist needs no redeploy). Returns the names signalled."""
    runtime = runtime_for(spec.env)
    names = [r["name"] for r in facts.units(runner, runtime, spec.name, check=False)
             if r["service"] == "api" and r["state"] == "running"]
    for unit in names:
        runner.run(runtime.reload(unit), check=False)
    return names


def setup_env(spec: DeploymentSpec, *, service: str = "all", dry_run: bool = False,
              extra_env: dict[str, str] | None = None,
              runners: RunnerFactory | None = None) -> list[HostOutcome]:
    """The setup stage on every host of ``spec`` in parallel; one outcome per host.

    ``extra_env`` adds hub variables (``HF_ENDPOINT`` of a mirror...) to those taken from this
    process's environment.
    """
    if service not in ("vllm", "api", "all"):
        raise AlbertError(f"--service must be vllm, api or all, not {service!r}")
    placement = resolved(spec).placement
    hf = spec.env.secrets.get("hf_token")
    token = hf.resolve() if hf else None
    environ = {**os.environ, **(extra_env or {})}
    hub_env = {k: environ[k] for k in cmds.HUB_ENV if environ.get(k)}
    wanted = {"vllm", "api"} if service == "all" else {service}

    def work(runner: Runner, host, cancel) -> SetupReport:
        return setup_host(
            runner, spec, env_name=spec.name, config_dir=spec.config_dir,
            services=wanted & set(host.services),
            models=[i.model_id for i in placement.vllm_on(host.name)],
            hf_token=token.get_secret_value() if token else None, hub_env=hub_env,
            dry_run=dry_run)

    return fan_out(spec.env.hosts, work, runners or ssh_runners(spec))
