"""Test hosts, the pure part: addresses and names of a host by its index, the commands that
build its namespaces and veth pair, the setup script of its mount namespace (which machine paths
stay visible), and the sshd / dockerd command lines. Nothing here runs anything."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
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
    checkout = Path(__file__).resolve().parents[2]  # pyalbert/devtools/testhost_cmds.py -> the checkout
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
