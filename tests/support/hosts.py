"""Pytest fixtures: namespace test hosts (``pyalbert.devtools.testhosts``) and environments pointing at them.

Import the fixtures in a conftest (``from tests.support.hosts import *``, as
tests/integration/conftest.py does)::

    def test_x(make_host, host_environment):
        a, b = make_host(docker=True), make_host(docker=False)
        config_dir = host_environment([a, b], extra='runtime = "docker"')
        spec = load_spec("test", config_dir)          # hosts a and b, user gitlab, port 22
        SSHRunner(spec.env.hosts[0], spec.env.ssh).run(Cmd.of("docker", "ps"))

- ``make_host(docker=True, name=None, visible=None)``: session-scoped factory (``visible``: machine
  paths the host sees at the same place; default the checkout and the running venv). Each host gets a fresh index
  >= 100 (address ``10.210.N.2``), is up when returned, and is torn down at the end of the
  session, even on failure; ``make_host.release(host)`` tears one down earlier. Hosts left by a
  crashed session (its pid gone) are cleaned when the next session starts.
- ``one_host``: one docker host for one test (torn down after it).
- ``host_environment(hosts, extra="", name="test")``: writes ``environments/<name>.toml`` for
  these hosts into the test's config folder (``config_factory``), plus a one-model routing table
  unless one is there or ``routing=`` is given, sets ``SSH_PRIVATE_KEY`` and
  ``SSH_KNOWN_HOSTS`` for the test, returns the config folder.
- ``busybox_image(host)``: imports a 2 MB ``albert-busybox:test`` image into a host's dockerd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from pyalbert.devtools.testhosts import DEFAULT_ROOT, NamespaceHost, claim_index, cleanup_stale

BUSYBOX_IMAGE = "albert-busybox:test"
#: a one-model routing table written when the test gives none
DEFAULT_ROUTING = {"tiny": {"model": "albert-test/tiny", "port": 8001, "max_model_len": 2048}}
REQUIRED_TOOLS = ("ip", "unshare", "nsenter", "sshd", "ssh-keygen", "findmnt")


def host_support_problem() -> str | None:
    """Why namespace hosts cannot run here, or None."""
    if os.geteuid() != 0:
        return "namespace test hosts need root"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t, path=path)]
    if missing:
        return f"missing tools for namespace test hosts: {' '.join(missing)} (run scripts/bootstrap)"
    return None


class HostFactory:
    """Makes hosts with unique indexes; tears every one down at close()."""

    def __init__(self, root: Path = DEFAULT_ROOT):
        self.root = root
        self.hosts: list[NamespaceHost] = []

    def __call__(self, docker: bool = True, name: str | None = None,
                 visible: Sequence[Path] | None = None) -> NamespaceHost:
        index = claim_index(self.root)
        extra = {} if visible is None else {"visible": visible}
        host = NamespaceHost(name or f"t{index}", index, docker=docker, state_root=self.root,
                             owner_pid=os.getpid(), **extra)
        self.hosts.append(host)
        try:
            host.up()
        except BaseException:
            self.release(host)
            raise
        return host

    def release(self, host: NamespaceHost) -> None:
        try:
            host.down(purge=True)
        finally:
            if host in self.hosts:
                self.hosts.remove(host)

    def close(self) -> None:
        errors = []
        for host in list(self.hosts):
            try:
                self.release(host)
            except Exception as exc:  # keep tearing down the others
                errors.append(f"{host.name}: {exc}")
        if errors:
            raise RuntimeError("test host teardown failed: " + "; ".join(errors))


@pytest.fixture(scope="session")
def make_host():
    problem = host_support_problem()
    if problem:
        pytest.skip(problem)
    cleanup_stale(DEFAULT_ROOT)
    factory = HostFactory(DEFAULT_ROOT)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def one_host(make_host):
    host = make_host(docker=True)
    try:
        yield host
    finally:
        make_host.release(host)


def environment_toml(hosts: Sequence[NamespaceHost], extra: str = "", user: str = "gitlab") -> str:
    """An environment file for these hosts (``extra``: more top-level keys/tables, TOML)."""
    top, tables = [], []
    in_table = False
    for line in extra.strip().splitlines():
        in_table = in_table or line.lstrip().startswith("[")
        (tables if in_table else top).append(line)
    parts = ['tier = "testing"', *top, ""]
    for host in hosts:
        parts += ["[[hosts]]", f'name = "{host.name}"', f'address = "{host.address}"',
                  f'user = "{user}"', "gpus = 0", ""]
    parts += tables
    return "\n".join(parts) + "\n"


def write_known_hosts(hosts: Sequence[NamespaceHost], path: Path) -> Path:
    path.write_text("".join(h.known_hosts for h in hosts))
    return path


def ssh_environ(hosts: Sequence[NamespaceHost], folder: Path) -> dict[str, str]:
    """``SSH_PRIVATE_KEY`` (path of the client key) and ``SSH_KNOWN_HOSTS`` (a file for hosts)."""
    if not hosts:
        raise ValueError("no hosts")
    known = write_known_hosts(hosts, folder / "known_hosts")
    return {"SSH_PRIVATE_KEY": str(hosts[0].client_key), "SSH_KNOWN_HOSTS": str(known)}


@pytest.fixture
def host_environment(config_factory, monkeypatch, tmp_path):
    def write(hosts: Sequence[NamespaceHost], extra: str = "", name: str = "test",
              user: str = "gitlab", routing: dict | None = None) -> Path:
        config_factory.env(environment_toml(hosts, extra, user), name=name)
        table = config_factory.root / "llm_routing_table.json"
        if routing is not None or not table.exists():
            config_factory.routing(routing or DEFAULT_ROUTING)
        for key, value in ssh_environ(hosts, tmp_path).items():
            monkeypatch.setenv(key, value)
        return config_factory.root

    return write


def busybox_image(host: NamespaceHost, tag: str = BUSYBOX_IMAGE) -> str:
    """Import a ``FROM scratch`` + static busybox image into the host's dockerd (about 1 s)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        rootfs = Path(tmp)
        (rootfs / "bin").mkdir()
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        for applet in ("sh", "sleep", "cat", "echo", "ls", "wget", "httpd", "true"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(host.docker_cmd("import", "-", tag), stdin=tar.stdout, check=True,
                       capture_output=True, timeout=120)
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
    return tag


__all__ = ["make_host", "one_host", "host_environment"]


@pytest.fixture(scope="module")
def fake_vllm_host(make_host):
    """A host with its own dockerd, the fake vLLM image and the front door's HAProxy image
    (``images.edge`` of the docker runtime) loaded: ``(host, vLLM image tag)``."""
    from tests.support.fake_vllm.image import ensure_fake_vllm_image
    from tests.support.images import ensure_haproxy_image

    image = ensure_fake_vllm_image()
    h = make_host(docker=True)
    h.load_image(image)
    h.load_image(ensure_haproxy_image())
    return h, image
