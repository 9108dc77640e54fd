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
``<root>/h<N>``, cgroup parent ``/albert-h<N>``. Building commands is pure (``*_cmd`` functions,
``testhost_cmds``); :class:`NamespaceHost` (``namespace_host``) runs them, with the process helpers
of ``testhost_procs``. This module is the public entry (the CLI, ``tests/support/hosts.py``): the
hosts on the machine (load, list, claim an index, clean up leftovers), and the names used from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pyalbert.devtools.namespace_host import NamespaceHost
from pyalbert.devtools.testhost_cmds import (
    DAEMON_PATH,
    DEFAULT_ROOT,
    kept_paths,
    known_hosts_line,
    netns_name,
    nsenter_argv,
    setup_script,
    veth_create_cmds,
)
from pyalbert.devtools.testhost_procs import (
    ensure_client_key,
    pid_alive,
    pids_in_namespaces,
    state_lock,
)
from pyalbert.errors import AlbertError

__all__ = [
    "DAEMON_PATH",
    "DEFAULT_ROOT",
    "NamespaceHost",
    "claim_index",
    "cleanup_stale",
    "ensure_client_key",
    "kept_paths",
    "known_hosts_line",
    "list_hosts",
    "load_host",
    "nsenter_argv",
    "pid_alive",
    "pids_in_namespaces",
    "setup_script",
    "veth_create_cmds",
]


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
    with state_lock(root):
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
