"""Test hosts, the process side: running a command, whether a pid lives, the pids in a host's
namespaces and killing them (by pid, never by name), the state folder's lock, and the machine-wide
pieces every host shares (the ``gitlab`` user, the client SSH key)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyalbert.commands.base import Cmd
from pyalbert.devtools.testhost_cmds import (
    DEFAULT_ROOT,
    HOST_USER,
)
from pyalbert.errors import AlbertError


def run_argv(argv: Sequence[str], *, check: bool = True, input: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AlbertError(
            f"test host: '{shlex.join(argv)}' failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-800:]}"
        )
    return proc


def run_cmd(cmd: Cmd, *, check: bool = True) -> subprocess.CompletedProcess:
    return run_argv([str(t) for t in cmd.tokens], check=check)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def ns_inode(path: str) -> int | None:
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


def is_mountpoint(path: Path) -> bool:
    return run_argv(["mountpoint", "-q", str(path)], check=False).returncode == 0


@contextlib.contextmanager
def state_lock(root: Path) -> Iterator[None]:
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
    if run_argv(["getent", "passwd", user], check=False).returncode == 0:
        return False
    proc = run_argv(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", "-U", user], check=False)
    if proc.returncode not in (0, 9):  # 9: created meanwhile by another session
        raise AlbertError(f"test host: cannot create user {user}: {proc.stderr.strip()}")
    if run_argv(["getent", "group", "docker"], check=False).returncode == 0:
        run_argv(["usermod", "-aG", "docker", user])
    return True


def ensure_client_key(root: Path = DEFAULT_ROOT) -> Path:
    """The SSH key the tools use to reach every test host (``<root>/client/id_ed25519``)."""
    key = root / "client" / "id_ed25519"
    if key.exists():
        return key
    with state_lock(root):
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            run_argv(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "albert-testhost-client",
                  "-f", str(key)])
    return key
