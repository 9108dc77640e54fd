"""Docker images for tests, built only from local material (no registry pulls).

A Debian rootfs made once with ``debootstrap`` (cached under ``$ALBERT_TEST_CACHE``), imported
as ``albert-test/bookworm:base``; a Python image on top of it from ``.deb`` files fetched on the
machine (containers have no network). A root-namespace ``dockerd`` builds them; namespace hosts
get them with :func:`load_into`.

Usable from several processes at once: every build step holds a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("ALBERT_TEST_CACHE", "/var/cache/albert-test"))
ROOT_SOCKET = "/run/docker.sock"
BASE_IMAGE = "albert-test/bookworm:base"
PYTHON_IMAGE = "albert-test/python:bookworm"
PYTHON_DEBS = ("python3", "python3-venv", "python3-pip", "ca-certificates", "curl", "procps")
#: the front door of the docker runtime's tests (``images.edge``): Debian's HAProxy
HAPROXY_IMAGE = "albert-test/haproxy:bookworm"
#: where scripts/bootstrap pins the Ray of the venv runtime (``pip install ray==X``)
BOOTSTRAP = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap"
#: the Ray image's venv (first on its PATH: ``ray`` and ``python3`` are its own)
RAY_IMAGE_VENV = "/opt/ray"
#: Ray's client extra (grpcio): a head told ``--ray-client-server-port`` (the deploy pins every
#: port) refuses to start without it; the venv runtime's Ray has it from vLLM's packages
RAY_REQUIREMENT = "ray[client]=={version}"


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def docker(*args: str, socket: str = ROOT_SOCKET, **kwargs) -> subprocess.CompletedProcess:
    return _run(["docker", "-H", f"unix://{socket}", *args], **kwargs)


def ensure_dockerd(socket: str = ROOT_SOCKET, timeout: float = 60) -> str:
    """A dockerd in the root namespace (started once, left running for later sessions)."""
    probe = ["docker", "-H", f"unix://{socket}", "info", "--format", "{{.ServerVersion}}"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return socket
    with build_lock("dockerd"):
        if subprocess.run(probe, capture_output=True).returncode != 0:
            log = open(CACHE / "dockerd.log", "ab")  # noqa: SIM115 - owned by the daemon
            subprocess.Popen(
                ["dockerd", "-H", f"unix://{socket}", "--shutdown-timeout=3"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while subprocess.run(probe, capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not start in {timeout}s: see {CACHE}/dockerd.log")
                time.sleep(0.3)
    return socket


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def ensure_rootfs() -> Path:
    """A minimal Debian bookworm rootfs (debootstrap, ~30 s once)."""
    rootfs = CACHE / "rootfs-bookworm"
    with build_lock("rootfs"):
        if (rootfs / ".albert-complete").exists():
            return rootfs
        shutil.rmtree(rootfs, ignore_errors=True)
        tmp = CACHE / "rootfs-bookworm.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["debootstrap", "--variant=minbase", "bookworm", str(tmp), debian_mirror()])
        shutil.copy("/etc/resolv.conf", tmp / "etc/resolv.conf")
        _run(["chroot", str(tmp), "apt-get", "update", "-qq"])
        (tmp / ".albert-complete").touch()
        tmp.rename(rootfs)
    return rootfs


def image_exists(tag: str, socket: str = ROOT_SOCKET) -> bool:
    probe = ["docker", "-H", f"unix://{socket}", "image", "inspect", tag]
    return subprocess.run(probe, capture_output=True).returncode == 0


def ensure_base_image(socket: str = ROOT_SOCKET) -> str:
    ensure_dockerd(socket)
    with build_lock("base-image"):
        if not image_exists(BASE_IMAGE, socket):
            rootfs = ensure_rootfs()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./var/lib/apt/lists/*",
                                    "--exclude=./var/cache/apt/*", "-c", "."], stdout=subprocess.PIPE)
            docker("import", "-", BASE_IMAGE, socket=socket, stdin=tar.stdout)
            tar.wait()
    return BASE_IMAGE


def fetch_debs(packages: tuple[str, ...], dest: Path) -> list[Path]:
    """Download .deb files (with dependencies missing from the base) on the machine."""
    rootfs = ensure_rootfs()
    with build_lock("debs"):
        cache = rootfs / "tmp" / "albert-debs"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "partial").mkdir(exist_ok=True)
        _run(["chroot", str(rootfs), "apt-get", "install", "-y", "-qq", "--download-only",
              "-o", "Dir::Cache::archives=/tmp/albert-debs", *packages])
        dest.mkdir(parents=True, exist_ok=True)
        debs = []
        for deb in sorted(cache.glob("*.deb")):
            shutil.copy(deb, dest / deb.name)
            debs.append(dest / deb.name)
    return debs


def build(context: Path, tag: str, socket: str = ROOT_SOCKET, dockerfile: str = "Dockerfile",
          build_args: dict[str, str] | None = None) -> str:
    args = [f"--build-arg={k}={v}" for k, v in (build_args or {}).items()]
    docker("build", "-q", "-t", tag, "-f", str(context / dockerfile), *args, str(context), socket=socket)
    return tag


def ensure_python_image(socket: str = ROOT_SOCKET) -> str:
    """``albert-test/python:bookworm``: Debian python3 + venv + pip + curl, no network needed."""
    ensure_base_image(socket)
    with build_lock("python-image"):
        if not image_exists(PYTHON_IMAGE, socket):
            with tempfile.TemporaryDirectory(prefix="albert-python-image-") as tmp:
                context = Path(tmp)
                fetch_debs(PYTHON_DEBS, context / "debs")
                (context / "Dockerfile").write_text(
                    f"FROM {BASE_IMAGE}\n"
                    "COPY debs /tmp/debs\n"
                    "RUN apt-get install -y -qq --no-install-recommends /tmp/debs/*.deb "
                    "&& rm -rf /tmp/debs /var/lib/apt/lists/* /var/cache/apt/*\n"
                    'CMD ["python3"]\n'
                )
                build(context, PYTHON_IMAGE, socket)
    return PYTHON_IMAGE


def ensure_haproxy_image(socket: str = ROOT_SOCKET) -> str:
    """``albert-test/haproxy:bookworm``: Debian's haproxy package, no network needed."""
    ensure_base_image(socket)
    with build_lock("haproxy-image"):
        if not image_exists(HAPROXY_IMAGE, socket):
            with tempfile.TemporaryDirectory(prefix="albert-haproxy-image-") as tmp:
                context = Path(tmp)
                fetch_debs(("haproxy",), context / "debs")
                (context / "Dockerfile").write_text(
                    f"FROM {BASE_IMAGE}\n"
                    "COPY debs /tmp/debs\n"
                    "RUN apt-get install -y -qq --no-install-recommends /tmp/debs/*.deb "
                    "&& rm -rf /tmp/debs /var/lib/apt/lists/* /var/cache/apt/*\n"
                    'ENTRYPOINT ["haproxy"]\n'
                )
                build(context, HAPROXY_IMAGE, socket)
    return HAPROXY_IMAGE


def ray_version() -> str:
    """The Ray version scripts/bootstrap installs for the venv runtime (one Ray everywhere)."""
    found = re.search(r"\bray==([0-9][0-9a-z.]*)", BOOTSTRAP.read_text())
    if not found:
        raise RuntimeError(f"no `ray==VERSION` in {BOOTSTRAP}: the Ray image follows its pin")
    return found[1]


def ray_image_tag(version: str | None = None) -> str:
    return f"albert-test/ray:{version or ray_version()}"


def fetch_ray_wheels(version: str) -> Path:
    """Ray and its dependencies as wheels for the image's Python (bookworm: CPython 3.11),
    downloaded once on the machine (the image build has no network)."""
    wheels = CACHE / f"ray-wheels-client-{version}"
    with build_lock("ray-wheels"):
        if (wheels / ".albert-complete").exists():
            return wheels
        tmp = wheels.with_name(wheels.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
              "--python-version", "3.11", "--implementation", "cp",
              "--platform", "manylinux2014_x86_64", "-d", str(tmp),
              RAY_REQUIREMENT.format(version=version)])
        (tmp / ".albert-complete").touch()
        shutil.rmtree(wheels, ignore_errors=True)
        tmp.rename(wheels)
    return wheels


def ensure_ray_image(socket: str = ROOT_SOCKET) -> str:
    """``albert-test/ray:<version>``: the Python image plus a venv with the Ray of the venv
    runtime (``ray`` on the PATH), the image of the docker runtime's Ray nodes in tests.

    The wheels are installed by a container that mounts them read-only, then committed, so they
    never become a layer of the image (no BuildKit here for ``RUN --mount``).
    """
    ensure_python_image(socket)
    version = ray_version()
    tag = ray_image_tag(version)
    with build_lock("ray-image"):
        if image_exists(tag, socket):
            return tag
        wheels = fetch_ray_wheels(version)
        name = "albert-test-ray-install"
        subprocess.run(["docker", "-H", f"unix://{socket}", "rm", "-f", name], capture_output=True)
        try:
            docker("run", "--name", name, "--network", "none", "-v", f"{wheels}:/mnt/wheels:ro",
                   PYTHON_IMAGE, "sh", "-c",
                   f"python3 -m venv {RAY_IMAGE_VENV} && {RAY_IMAGE_VENV}/bin/pip install -q "
                   "--no-index --no-cache-dir --find-links /mnt/wheels "
                   f"'{RAY_REQUIREMENT.format(version=version)}'",
                   socket=socket)
            path = f"{RAY_IMAGE_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            docker("commit", "--change", f"ENV PATH={path}", "--change", 'ENTRYPOINT ["ray"]',
                   "--change", "CMD []", name, tag, socket=socket)
        finally:
            subprocess.run(["docker", "-H", f"unix://{socket}", "rm", "-f", name],
                           capture_output=True)
    return tag


def save(tag: str, socket: str = ROOT_SOCKET) -> Path:
    """``docker save`` of ``tag``, cached by image id (for loading into namespace hosts)."""
    image_id = docker("image", "inspect", "--format", "{{.Id}}", tag, socket=socket).stdout.strip()
    path = CACHE / "saved" / f"{image_id.replace(':', '-')}.tar"
    with build_lock("save"):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            docker("save", "-o", f"{path}.partial", tag, socket=socket)
            os.replace(f"{path}.partial", path)
    return path


def load_into(tag: str, target_socket: str, source_socket: str = ROOT_SOCKET) -> None:
    """Make ``tag`` available to the dockerd behind ``target_socket`` (a namespace host's)."""
    if image_exists(tag, target_socket):
        return
    docker("load", "-q", "-i", str(save(tag, source_socket)), socket=target_socket)
