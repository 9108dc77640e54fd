"""Test hosts on one machine: a network namespace that looks like an Ubuntu 22.04 server.

A host is a network namespace (veth ``10.210.N.1/24`` here, ``10.210.N.2/24`` there, no default
route) plus a persistent mount + UTS namespace in which per-host directories are bound over
``/run``, ``/var/lib/docker``, ``/etc/ssh``, ``/etc/sudoers.d``, ``/home/gitlab``, ``/root/.ssh``,
``/data``, ``/tmp``, ``/etc/hosts``, ``/etc/hostname`` and ``/etc/os-release``. Its own ``sshd`` (and optionally
``dockerd``) run there, so ``ssh gitlab@10.210.N.2 docker ps`` reaches *that* host's daemon.

Shared with the machine: the root filesystem, ``/etc/passwd`` and the dpkg database (an apt
install on one host is on all), and the PID namespace (processes are killed by pid, never by
name). The local environment's host is ``local``, index 0 (``albert testhost up``); tests use
indexes >= 100 (``tests/support/hosts.py``).

Everything a host owns is named after its index: netns ``alb<N>``, veth ``albh<N>``, state dir
``<root>/h<N>``, cgroup parent ``/albert-h<N>``. Building commands is pure (``*_cmd`` functions);
:class:`NamespaceHost` runs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyalbert.commands.base import Cmd
from pyalbert.errors import AlbertError

DEFAULT_ROOT = Path(os.environ.get("ALBERT_TESTHOST_ROOT", "/var/lib/albert-testhosts"))
HOST_USER = "gitlab"
SUBNET = "10.210"

UBUNTU_OS_RELEASE = """\
PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
UBUNTU_CODENAME=jammy
"""

SSHD_CONFIG = """\
# written by pyalbert.devtools.testhosts
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
UsePAM yes
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
PrintMotd no
AcceptEnv LANG LC_*
MaxStartups 100:30:200
MaxSessions 50
Subsystem sftp /usr/lib/openssh/sftp-server
"""

#: directories bound over the same path inside the host, from ``<state>/<key>``
BIND_DIRS = {
    "docker": "/var/lib/docker",
    "etc-ssh": "/etc/ssh",
    "home-gitlab": f"/home/{HOST_USER}",
    "root-ssh": "/root/.ssh",
    "sudoers.d": "/etc/sudoers.d",
    "data": "/data",
    "tmp": "/tmp",
    "run": "/run",
}
BIND_FILES = {
    "hosts": "/etc/hosts",
    "hostname": "/etc/hostname",
    "os-release": "/etc/os-release",
}
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- pure builders ---------------------------------------------------------------------------


def address_of(index: int, side: int = 2) -> str:
    return f"{SUBNET}.{index}.{side}"


def netns_name(index: int) -> str:
    return f"alb{index}"


def veth_name(index: int) -> str:
    return f"albh{index}"


def netns_add_cmd(index: int) -> Cmd:
    return Cmd.of("ip", "netns", "add", netns_name(index))


def veth_create_cmds(index: int) -> list[Cmd]:
    """The veth pair: host side ``.1`` here, ``eth0`` with ``.2`` in the namespace, no route."""
    ns, host, peer = netns_name(index), veth_name(index), f"albn{index}"
    return [
        Cmd.of("ip", "link", "add", host, "type", "veth", "peer", "name", peer),
        Cmd.of("ip", "link", "set", peer, "netns", ns),
        Cmd.of("ip", "-n", ns, "link", "set", peer, "name", "eth0"),
        Cmd.of("ip", "-n", ns, "addr", "replace", f"{address_of(index)}/24", "dev", "eth0"),
        Cmd.of("ip", "-n", ns, "link", "set", "eth0", "up"),
        Cmd.of("ip", "-n", ns, "link", "set", "lo", "up"),
        Cmd.of("ip", "addr", "replace", f"{address_of(index, 1)}/24", "dev", host),
        Cmd.of("ip", "link", "set", host, "up"),
    ]


def mount_ns_create_cmd(ns_dir: Path) -> Cmd:
    return Cmd.of(
        "unshare", f"--mount={ns_dir}/mnt", f"--uts={ns_dir}/uts", "--propagation", "private", "true"
    )


def nsenter_argv(ns_dir: Path, index: int, argv: Sequence[str]) -> list[str]:
    """Run ``argv`` inside the host (its mount, UTS and network namespaces), as root."""
    return [
        "nsenter",
        f"--mount={ns_dir}/mnt",
        f"--uts={ns_dir}/uts",
        f"--net=/run/netns/{netns_name(index)}",
        "--",
        *argv,
    ]


def hidden_by_binds(path: Path) -> str | None:
    """The host directory bound over ``path`` (so the host cannot see it), or None."""
    for target in (*BIND_DIRS.values(), "/var/run"):
        if path.is_relative_to(target):
            return target
    return None


def kept_paths(paths: Sequence[Path]) -> list[Path]:
    """Those of ``paths`` that a host's binds would hide, outermost only, refused if unkeepable.

    A checkout (or venv) under ``/tmp`` is handed to hosts by path (``bash <checkout>/utils/...``,
    a ``.pth`` into the checkout); such paths are bound back into the host at the same place.
    """
    kept: list[Path] = []
    for path in sorted({Path(p).resolve() for p in paths}, key=lambda p: (len(p.parts), str(p))):
        for target in (*BIND_DIRS.values(), *BIND_FILES.values()):
            if Path(target).is_relative_to(path):
                raise AlbertError(
                    f"test hosts: {path} contains {target}, which every host replaces with its "
                    f"own, so hosts cannot see it. Fix: clone the repository into a folder of its "
                    f"own (e.g. /srv/albert or /tmp/albert).")
        if hidden_by_binds(path) and not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept


def machine_paths_for_hosts() -> list[Path]:
    """The checkout this package runs from (if it is one) and the running venv: tests and the local
    environment hand paths inside them to hosts."""
    checkout = Path(__file__).resolve().parents[2]  # pyalbert/devtools/testhosts.py -> the checkout
    paths = [Path(sys.prefix)]
    if (checkout / "pyproject.toml").exists():
        paths.append(checkout)
    return paths


def setup_script(name: str, state: Path, keep: Sequence[Path] = ()) -> str:
    """What runs once inside a new mount namespace to make it the host's view of the machine.

    Copied nsfs mounts (``/run/netns/*``, other hosts' namespace files) are unmounted, else they
    keep deleted namespaces alive. A fresh sysfs shows this namespace's network devices; the
    cgroup mounts are moved back on top of it (dockerd needs them). Each ``keep`` path (from
    :func:`kept_paths`: the checkout when it lies under ``/tmp``, say) is parked under the state
    dir before the binds hide it and bound back, read-only, at the same path after them.
    """
    q = shlex.quote
    lines = [
        "set -e",
        "mount --make-rprivate /",
        "findmnt -rn -t nsfs -o TARGET | while read -r t; do umount -l \"$t\" || true; done",
        f"hostname {q(name)}",
        f"mount --move /sys/fs/cgroup {q(str(state / 'cgroup'))}",
        "mount -t sysfs sysfs /sys",
        f"mount --move {q(str(state / 'cgroup'))} /sys/fs/cgroup",
    ]
    parked = [(path, state / "keep" / str(i)) for i, path in enumerate(keep)]
    for path, park in parked:
        lines += [f"mkdir -p {q(str(park))}", f"mount --bind {q(str(path))} {q(str(park))}"]
    # files first and /tmp, /run last: a state root below them would be hidden by their binds
    for key, target in {**BIND_FILES, **BIND_DIRS}.items():
        lines.append(f"mount --bind {q(str(state / key))} {q(target)}")
    for path, park in parked:
        # read-only: a host cleaning its /tmp must never reach into the machine's checkout
        lines += [f"mkdir -p {q(str(path))}", f"mount --bind {q(str(park))} {q(str(path))}",
                  f"mount -o remount,bind,ro {q(str(path))}"]
    return "\n".join(lines) + "\n"


def sshd_argv() -> list[str]:
    return ["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config"]


def dockerd_argv(index: int) -> list[str]:
    return [
        "dockerd",
        f"--cgroup-parent=/albert-h{index}",
        "--shutdown-timeout=3",
        "--host=unix:///run/docker.sock",
        "--pidfile=/run/docker.pid",
    ]


def known_hosts_line(address: str, host_pubkey: str) -> str:
    """``10.210.N.2 ssh-ed25519 AAAA...`` (the comment dropped)."""
    kind, key = host_pubkey.split()[:2]
    return f"{address} {kind} {key}\n"


# --- small process helpers -------------------------------------------------------------------


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AlbertError(
            f"test host: '{shlex.join(argv)}' failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}"
        )
    return proc


def _run_cmd(cmd: Cmd, *, check: bool = True) -> subprocess.CompletedProcess:
    return _run([str(t) for t in cmd.tokens], check=check)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_namespaces(inodes: set[int]) -> list[int]:
    """Processes whose network or mount namespace is one of ``inodes``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for kind in ("net", "mnt"):
            try:
                if os.stat(f"/proc/{entry}/ns/{kind}").st_ino in inodes:
                    found.append(int(entry))
                    break
            except OSError:
                break
    return [p for p in found if p != os.getpid()]


def kill_pids(pids: Sequence[int], timeout: float = 6.0) -> None:
    """SIGTERM, wait, SIGKILL what is left. Reaps our own children."""
    pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        pids = [p for p in pids if pid_alive(p)]
        if pids:
            time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _is_mountpoint(path: Path) -> bool:
    return _run(["mountpoint", "-q", str(path)], check=False).returncode == 0


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- machine-wide pieces: the gitlab user and the client key ---------------------------------


def ensure_user(user: str = HOST_USER) -> bool:
    """The machine-wide ``gitlab`` user (locked password, in group docker). True if created."""
    home = Path(f"/home/{user}")
    home.mkdir(exist_ok=True)
    Path("/root/.ssh").mkdir(mode=0o700, exist_ok=True)
    for path in ("/var/lib/docker", "/data", "/etc/sudoers.d"):
        Path(path).mkdir(exist_ok=True)
    if _run(["getent", "passwd", user], check=False).returncode == 0:
        return False
    proc = _run(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", "-U", user], check=False)
    if proc.returncode not in (0, 9):  # 9: created meanwhile by another session
        raise AlbertError(f"test host: cannot create user {user}: {proc.stderr.strip()}")
    if _run(["getent", "group", "docker"], check=False).returncode == 0:
        _run(["usermod", "-aG", "docker", user])
    return True


def ensure_client_key(root: Path = DEFAULT_ROOT) -> Path:
    """The SSH key the tools use to reach every test host (``<root>/client/id_ed25519``)."""
    key = root / "client" / "id_ed25519"
    if key.exists():
        return key
    with _locked(root):
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "albert-testhost-client",
                  "-f", str(key)])
    return key


# --- the host --------------------------------------------------------------------------------


@dataclass
class NamespaceHost:
    """One fake Ubuntu host. ``up()`` and ``down()`` are idempotent and always safe."""

    name: str
    index: int
    docker: bool = False
    state_root: Path = DEFAULT_ROOT
    #: pid of the process that owns the host (a test session): hosts whose owner died are leftovers
    owner_pid: int | None = None
    #: machine paths the host must see at the same place (the checkout, the running venv)
    visible: Sequence[Path] = field(default_factory=lambda: machine_paths_for_hosts())
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 255:
            raise AlbertError(f"test host {self.name}: index {self.index} is outside 0..255")
        self.state_root = Path(self.state_root).resolve()
        if any(self.state_root.is_relative_to(p) for p in ("/tmp", "/run", "/var/run")):
            raise AlbertError(
                f"test host {self.name}: state root {self.state_root} is under /tmp or /run, which "
                f"the host's own /tmp and /run hide. Fix: use a folder elsewhere (default "
                f"{DEFAULT_ROOT}, or $ALBERT_TESTHOST_ROOT).")
        kept_paths(self.visible)  # refuses, before any change, a checkout hosts cannot see

    # -- where things are
    @property
    def state(self) -> Path:
        return self.state_root / f"h{self.index}"

    @property
    def ns_dir(self) -> Path:
        return self.state / "ns"

    @property
    def address(self) -> str:
        return address_of(self.index)

    @property
    def gateway(self) -> str:
        """This machine's address as seen from the host."""
        return address_of(self.index, 1)

    @property
    def netns(self) -> str:
        return netns_name(self.index)

    @property
    def docker_socket(self) -> Path:
        """The host's dockerd socket, usable from the machine: ``docker -H unix://<this>``."""
        return self.state / "run" / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.docker_socket}"

    @property
    def known_hosts_file(self) -> Path:
        return self.state / "known_hosts"

    @property
    def client_key(self) -> Path:
        return self.state_root / "client" / "id_ed25519"

    @property
    def known_hosts(self) -> str:
        return self.known_hosts_file.read_text()

    # -- status
    def _pid(self, daemon: str) -> int | None:
        try:
            return int((self.state / f"{daemon}.pid").read_text())
        except (OSError, ValueError):
            return None

    def _daemon_up(self, daemon: str) -> bool:
        pid = self._pid(daemon)
        if not pid_alive(pid):
            return False
        netns = _ns_inode(f"/run/netns/{self.netns}")
        return netns is not None and _ns_inode(f"/proc/{pid}/ns/net") == netns

    def status(self) -> dict[str, bool]:
        netns = Path(f"/run/netns/{self.netns}").exists()
        return {
            "netns": netns,
            "veth": Path(f"/sys/class/net/{veth_name(self.index)}").exists(),
            "mountns": (self.state / ".ns-ready").exists() and _is_mountpoint(self.ns_dir / "mnt"),
            "sshd": netns and self._daemon_up("sshd"),
            "dockerd": netns and self._daemon_up("dockerd"),
        }

    def is_up(self) -> bool:
        s = self.status()
        return all(v for k, v in s.items() if k != "dockerd") and (s["dockerd"] or not self.docker)

    # -- up
    def up(self, timeout: float = 30.0) -> list[str]:
        """Bring the host up; returns what was done (empty: it was up already)."""
        changes: list[str] = []
        if ensure_user():
            changes.append(f"user {HOST_USER} created")
        ensure_client_key(self.state_root)
        changes += self._ensure_state()
        status = self.status()
        if not status["netns"]:
            self._stop_daemons()  # a daemon in a deleted namespace is useless
            _run_cmd(netns_add_cmd(self.index))
            changes.append(f"netns {self.netns}")
        if not status["veth"]:
            for cmd in veth_create_cmds(self.index):
                _run_cmd(cmd)
            changes.append(f"veth {veth_name(self.index)} {self.gateway} <-> {self.address}")
        if not status["mountns"]:
            self._stop_daemons()
            self._drop_mount_ns()
            self._make_mount_ns()
            changes.append("mount/uts namespace")
        deadline = time.monotonic() + timeout
        if not self._daemon_up("sshd"):
            self._start("sshd", sshd_argv())
            changes.append("sshd started")
        if self.docker and not self._daemon_up("dockerd"):
            self._start("dockerd", dockerd_argv(self.index))
            changes.append("dockerd started")
        self._wait_sshd(deadline)
        if self.docker:
            self._wait_dockerd(deadline)
        return changes

    def _ensure_state(self) -> list[str]:
        s = self.state
        fresh = not s.exists()
        for key in (*BIND_DIRS, "ns", "cgroup"):
            (s / key).mkdir(parents=True, exist_ok=True)
        (s / "tmp").chmod(0o1777)
        (s / "sudoers.d").chmod(0o750)
        if fresh or not any((s / "sudoers.d").iterdir()):
            for f in Path("/etc/sudoers.d").glob("*"):
                if f.is_file():
                    shutil.copy2(f, s / "sudoers.d" / f.name)
        (s / "run" / "sshd").mkdir(exist_ok=True)
        (s / "root-ssh").chmod(0o700)
        (s / "hosts").write_text(f"127.0.0.1 localhost\n{self.address} {self.name}\n")
        (s / "hostname").write_text(f"{self.name}\n")
        (s / "os-release").write_text(UBUNTU_OS_RELEASE)
        (s / "host.json").write_text(json.dumps(
            {"name": self.name, "index": self.index, "docker": self.docker,
             "owner_pid": self.owner_pid}))
        etc_ssh = s / "etc-ssh"
        (etc_ssh / "sshd_config").write_text(SSHD_CONFIG)
        if Path("/etc/ssh/ssh_config").exists() and not (etc_ssh / "ssh_config").exists():
            shutil.copy("/etc/ssh/ssh_config", etc_ssh / "ssh_config")
        hostkey = etc_ssh / "ssh_host_ed25519_key"
        if not hostkey.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}",
                  "-f", str(hostkey)])
        pub = (etc_ssh / "ssh_host_ed25519_key.pub").read_text()
        self.known_hosts_file.write_text(known_hosts_line(self.address, pub))
        client_pub = (self.client_key.with_suffix(".pub")).read_text()
        self._authorize(s / "home-gitlab" / ".ssh", client_pub, HOST_USER)
        self._authorize(s / "root-ssh", client_pub, "root")
        return [f"state {s}"] if fresh else []

    @staticmethod
    def _authorize(ssh_dir: Path, pubkey: str, user: str) -> None:
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        if not keys.exists() or pubkey not in keys.read_text():
            with keys.open("a") as fh:
                fh.write(pubkey if pubkey.endswith("\n") else pubkey + "\n")
        keys.chmod(0o600)
        ssh_dir.chmod(0o700)
        shutil.chown(ssh_dir, user, user)
        shutil.chown(keys, user, user)
        if user != "root":
            shutil.chown(ssh_dir.parent, user, user)

    def _make_mount_ns(self) -> None:
        ns = self.ns_dir
        if not _is_mountpoint(ns):
            _run(["mount", "--bind", str(ns), str(ns)])
            _run(["mount", "--make-private", str(ns)])
        for f in ("mnt", "uts"):
            (ns / f).touch()
        _run_cmd(mount_ns_create_cmd(ns))
        script = setup_script(self.name, self.state, kept_paths(self.visible))
        _run(nsenter_argv(ns, self.index, ["sh", "-c", script]))
        (self.state / ".ns-ready").touch()

    def _drop_mount_ns(self) -> None:
        (self.state / ".ns-ready").unlink(missing_ok=True)
        for f in ("mnt", "uts"):
            path = self.ns_dir / f
            while _is_mountpoint(path):
                _run(["umount", str(path)], check=False)
                if _is_mountpoint(path):
                    _run(["umount", "-l", str(path)], check=False)
                    break

    def _start(self, daemon: str, argv: list[str]) -> None:
        log = open(self.state / f"{daemon}.log", "ab")  # noqa: SIM115 - handed to the daemon
        try:
            proc = subprocess.Popen(
                nsenter_argv(self.ns_dir, self.index, argv),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                start_new_session=True, env={"PATH": DAEMON_PATH, "LANG": "C.UTF-8"},
            )
        finally:
            log.close()
        self._procs[daemon] = proc
        (self.state / f"{daemon}.pid").write_text(str(proc.pid))

    def _log_tail(self, daemon: str) -> str:
        try:
            return "\n".join((self.state / f"{daemon}.log").read_text().splitlines()[-10:])
        except OSError:
            return ""

    def _wait_sshd(self, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection((self.address, 22), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if not pid_alive(self._pid("sshd")) or time.monotonic() > deadline:
                raise AlbertError(
                    f"test host {self.name}: sshd did not answer on {self.address}:22. "
                    f"Log ({self.state}/sshd.log):\n{self._log_tail('sshd')}")
            time.sleep(0.05)

    def _wait_dockerd(self, deadline: float) -> None:
        import httpx

        transport = httpx.HTTPTransport(uds=str(self.docker_socket))
        with httpx.Client(transport=transport, base_url="http://docker", timeout=2) as client:
            while True:
                try:
                    if client.get("/_ping").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if not pid_alive(self._pid("dockerd")) or time.monotonic() > deadline:
                    raise AlbertError(
                        f"test host {self.name}: dockerd is not ready at {self.docker_socket}. "
                        f"Log ({self.state}/dockerd.log):\n{self._log_tail('dockerd')}")
                time.sleep(0.05)

    # -- down
    def _remove_containers(self) -> None:
        if not self._daemon_up("dockerd") or not self.docker_socket.exists():
            return
        docker = ["docker", "-H", self.docker_host]
        ids = _run([*docker, "ps", "-aq"], check=False, timeout=20).stdout.split()
        if ids:
            _run([*docker, "rm", "-f", *ids], check=False, timeout=60)

    def _stop_daemons(self) -> None:
        pids = [p for p in (self._pid("dockerd"), self._pid("sshd")) if p]
        kill_pids([p for p in pids if pid_alive(p) and self._owns(p)])
        for daemon in ("dockerd", "sshd"):
            (self.state / f"{daemon}.pid").unlink(missing_ok=True)
            proc = self._procs.pop(daemon, None)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)

    def _owns(self, pid: int) -> bool:
        """The pid runs in this host's namespaces (a recycled pid elsewhere is left alone)."""
        inodes = self._ns_inodes()
        if not inodes:
            return False
        return pid in pids_in_namespaces(inodes)

    def _ns_inodes(self) -> set[int]:
        paths = [f"/run/netns/{self.netns}"]
        if _is_mountpoint(self.ns_dir / "mnt"):
            paths.append(str(self.ns_dir / "mnt"))
        return {i for i in map(_ns_inode, paths) if i is not None}

    def down(self, *, purge: bool = False) -> list[str]:
        """Stop everything the host runs and delete its network; ``purge`` also deletes its state.

        Safe to call on a host that is half up, down already, or never existed.
        """
        done: list[str] = []
        self._remove_containers()
        inodes = self._ns_inodes()
        if self._pid("sshd") or self._pid("dockerd"):
            self._stop_daemons()
            done.append("daemons stopped")
        if inodes:
            left = pids_in_namespaces(inodes)
            if left:
                kill_pids(left)
                done.append(f"{len(left)} leftover processes killed")
        if _is_mountpoint(self.ns_dir / "mnt"):
            done.append("mount/uts namespace")
        self._drop_mount_ns()
        if _is_mountpoint(self.ns_dir):
            _run(["umount", "-l", str(self.ns_dir)], check=False)
        if Path(f"/sys/class/net/{veth_name(self.index)}").exists():
            _run(["ip", "link", "del", veth_name(self.index)], check=False)
            done.append(f"veth {veth_name(self.index)}")
        if Path(f"/run/netns/{self.netns}").exists():
            _run(["ip", "netns", "del", self.netns], check=False)
            done.append(f"netns {self.netns}")
        if purge and self.state.exists():
            if _run(["findmnt", "-rn", "-o", "TARGET"], check=False).stdout.find(
                str(self.state) + "/"
            ) >= 0:
                raise AlbertError(f"test host {self.name}: mounts remain under {self.state}; not purged")
            shutil.rmtree(self.state, ignore_errors=True)
            done.append(f"state {self.state} removed")
        return done

    # -- using the host
    def run(self, argv: Sequence[str] | str, *, check: bool = True, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command inside the host as root (for test assertions). A string runs in ``sh -c``."""
        args = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        proc = subprocess.run(
            nsenter_argv(self.ns_dir, self.index, args), input=input, capture_output=True,
            text=True, timeout=timeout, cwd="/", env={"PATH": DAEMON_PATH, "LANG": "C.UTF-8"},
        )
        if check and proc.returncode != 0:
            raise AlbertError(
                f"on test host {self.name}: {shlex.join(args)} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}")
        return proc

    def docker_cmd(self, *args: str) -> list[str]:
        """``docker -H unix://<socket> ...`` from the machine."""
        return ["docker", "-H", self.docker_host, *args]

    def load_image(self, image: str | Path, *, source_host: str = "unix:///run/docker.sock") -> None:
        """Load an image into the host's dockerd: a ``docker save`` tar, or a tag of the machine's
        dockerd (``source_host``), streamed with ``docker save | docker load``."""
        if not self.docker:
            raise AlbertError(f"test host {self.name} has no dockerd (make it with docker=True)")
        path = Path(image)
        if path.is_file():
            _run(self.docker_cmd("load", "-i", str(path)), timeout=600)
            return
        save = subprocess.Popen(["docker", "-H", source_host, "save", str(image)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        load = subprocess.run(self.docker_cmd("load"), stdin=save.stdout, capture_output=True,
                              timeout=600)
        assert save.stdout is not None
        save.stdout.close()
        save_err = save.stderr.read().decode() if save.stderr else ""
        if save.wait() != 0 or load.returncode != 0:
            raise AlbertError(
                f"test host {self.name}: cannot load image {image}: "
                f"{save_err.strip() or load.stderr.decode().strip()}")

    def env_vars(self) -> dict[str, str]:
        """What the tools need to reach this host: the client key and its known_hosts."""
        return {"SSH_PRIVATE_KEY": str(self.client_key),
                "SSH_KNOWN_HOSTS": str(self.known_hosts_file)}


# --- hosts on the machine --------------------------------------------------------------------


def load_host(state: Path) -> NamespaceHost | None:
    """The host described by ``<root>/h<N>/host.json``, or None."""
    try:
        meta = json.loads((state / "host.json").read_text())
    except (OSError, ValueError):
        return None
    return NamespaceHost(meta["name"], int(meta["index"]), docker=bool(meta.get("docker")),
                         state_root=state.parent, owner_pid=meta.get("owner_pid"))


def list_hosts(root: Path = DEFAULT_ROOT) -> list[NamespaceHost]:
    if not root.is_dir():
        return []
    hosts = [load_host(p) for p in sorted(root.glob("h[0-9]*"))]
    return [h for h in hosts if h is not None]


def claim_index(root: Path, start: int = 100, stop: int = 255) -> int:
    """Atomically reserve a free index in ``start..stop`` (its state dir is created)."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(start, stop + 1):
        if Path(f"/run/netns/{netns_name(index)}").exists():
            continue
        try:
            (root / f"h{index}").mkdir()
        except FileExistsError:
            continue
        return index
    raise AlbertError(f"no free test host index in {start}..{stop} under {root}: run cleanup_stale")


def cleanup_stale(root: Path = DEFAULT_ROOT, min_index: int = 100) -> list[str]:
    """Tear down test hosts left by a crashed session (owner pid gone). Returns their names."""
    cleaned = []
    with _locked(root):
        for state in sorted(root.glob("h[0-9]*")):
            host = load_host(state)
            if host is None:
                try:
                    index = int(state.name[1:])
                except ValueError:
                    continue
                if index < min_index or time.time() - state.stat().st_mtime < 60:
                    continue  # being claimed right now by another session
                host = NamespaceHost(state.name, index, state_root=root)
            elif host.index < min_index or pid_alive(host.owner_pid):
                continue
            host.down(purge=True)
            cleaned.append(host.name)
    return cleaned
