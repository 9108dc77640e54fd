"""``NamespaceHost``: one fake Ubuntu host (namespaces, state folder, sshd, dockerd), brought up
and down idempotently; commands come from ``testhost_cmds``, processes are handled by
``testhost_procs``."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyalbert.devtools.testhost_cmds import (
    BIND_DIRS,
    DAEMON_PATH,
    DEFAULT_ROOT,
    HOST_USER,
    SSHD_CONFIG,
    UBUNTU_OS_RELEASE,
    address_of,
    dockerd_argv,
    kept_paths,
    known_hosts_line,
    machine_paths_for_hosts,
    mount_ns_create_cmd,
    netns_add_cmd,
    netns_name,
    nsenter_argv,
    setup_script,
    sshd_argv,
    veth_create_cmds,
    veth_name,
)
from pyalbert.devtools.testhost_procs import (
    ensure_client_key,
    ensure_user,
    is_mountpoint,
    kill_pids,
    ns_inode,
    pid_alive,
    pids_in_namespaces,
    run_argv,
    run_cmd,
)
from pyalbert.errors import AlbertError


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
        netns = ns_inode(f"/run/netns/{self.netns}")
        return netns is not None and ns_inode(f"/proc/{pid}/ns/net") == netns

    def status(self) -> dict[str, bool]:
        netns = Path(f"/run/netns/{self.netns}").exists()
        return {
            "netns": netns,
            "veth": Path(f"/sys/class/net/{veth_name(self.index)}").exists(),
            "mountns": (self.state / ".ns-ready").exists() and is_mountpoint(self.ns_dir / "mnt"),
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
            run_cmd(netns_add_cmd(self.index))
            changes.append(f"netns {self.netns}")
        if not status["veth"]:
            for cmd in veth_create_cmds(self.index):
                run_cmd(cmd)
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
            run_argv(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}",
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
        if not is_mountpoint(ns):
            run_argv(["mount", "--bind", str(ns), str(ns)])
            run_argv(["mount", "--make-private", str(ns)])
        for f in ("mnt", "uts"):
            (ns / f).touch()
        run_cmd(mount_ns_create_cmd(ns))
        script = setup_script(self.name, self.state, kept_paths(self.visible))
        run_argv(nsenter_argv(ns, self.index, ["sh", "-c", script]))
        (self.state / ".ns-ready").touch()

    def _drop_mount_ns(self) -> None:
        (self.state / ".ns-ready").unlink(missing_ok=True)
        for f in ("mnt", "uts"):
            path = self.ns_dir / f
            while is_mountpoint(path):
                run_argv(["umount", str(path)], check=False)
                if is_mountpoint(path):
                    run_argv(["umount", "-l", str(path)], check=False)
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
        ids = run_argv([*docker, "ps", "-aq"], check=False, timeout=20).stdout.split()
        if ids:
            run_argv([*docker, "rm", "-f", *ids], check=False, timeout=60)

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
        if is_mountpoint(self.ns_dir / "mnt"):
            paths.append(str(self.ns_dir / "mnt"))
        return {i for i in map(ns_inode, paths) if i is not None}

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
        if is_mountpoint(self.ns_dir / "mnt"):
            done.append("mount/uts namespace")
        self._drop_mount_ns()
        if is_mountpoint(self.ns_dir):
            run_argv(["umount", "-l", str(self.ns_dir)], check=False)
        if Path(f"/sys/class/net/{veth_name(self.index)}").exists():
            run_argv(["ip", "link", "del", veth_name(self.index)], check=False)
            done.append(f"veth {veth_name(self.index)}")
        if Path(f"/run/netns/{self.netns}").exists():
            run_argv(["ip", "netns", "del", self.netns], check=False)
            done.append(f"netns {self.netns}")
        if purge and self.state.exists():
            if run_argv(["findmnt", "-rn", "-o", "TARGET"], check=False).stdout.find(
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
            run_argv(self.docker_cmd("load", "-i", str(path)), timeout=600)
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
