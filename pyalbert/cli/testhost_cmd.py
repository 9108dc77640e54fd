"""``albert testhost up|down|status``: a fake Ubuntu host in a network namespace on this machine.

The local environment's host is ``local``, index 0 (address 10.210.0.2). ``up`` prints the
variables the tools need (``SSH_PRIVATE_KEY``, ``SSH_KNOWN_HOSTS``): ``eval "$(albert testhost up
--quiet)"`` sets them in a shell.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("testhost", help="namespace test hosts on this machine (root, Linux)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("up", "bring a host up (idempotent): netns, sshd, optional dockerd, gitlab user, keys"),
        ("down", "stop a host's daemons and delete its network (idempotent)"),
        ("status", "show what of a host is up"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--name", default="local", help="host name (default: local)")
        action.add_argument("--index", type=int, default=0,
                            help="0..255: address 10.210.INDEX.2 (default: 0)")
        action.add_argument("--state-root", type=Path, default=None,
                            help="state folder (default: $ALBERT_TESTHOST_ROOT or /var/lib/albert-testhosts)")
        if name == "up":
            action.add_argument("--docker", action="store_true", help="also run a dockerd in the host")
            action.add_argument("--quiet", "-q", action="store_true",
                                help="print only the export lines")
        if name == "down":
            action.add_argument("--purge", action="store_true",
                                help="also delete its state (host key, docker data)")
        action.set_defaults(func=run_command)


def _host(args: argparse.Namespace):
    from pyalbert.devtools.testhosts import DEFAULT_ROOT, NamespaceHost, load_host

    root = args.state_root or DEFAULT_ROOT
    known = load_host(Path(root) / f"h{args.index}")
    docker = getattr(args, "docker", False) or bool(known and known.docker and args.action != "up")
    return NamespaceHost(args.name, args.index, docker=docker, state_root=root)


def run_command(args: argparse.Namespace) -> int:
    from pyalbert.errors import AlbertError
    from pyalbert.ui import console

    if os.geteuid() != 0:
        raise AlbertError("albert testhost needs root (network namespaces, mounts). Fix: run it with sudo.")
    host = _host(args)
    if args.action == "up":
        changes = host.up()
        if not args.quiet:
            what = ", ".join(changes) if changes else "already up, no change"
            console.print(f"host {host.name} ({host.address}): {what}", soft_wrap=True)
        for key, value in host.env_vars().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if args.action == "down":
        done = host.down(purge=args.purge)
        console.print(f"host {host.name}: {', '.join(done) if done else 'already down, no change'}")
        return 0
    status = host.status()
    parts = " ".join(f"{k}={'up' if v else 'down'}" for k, v in status.items())
    console.print(f"host {host.name} ({host.address}, state {host.state}): {parts}")
    return 0 if host.is_up() else 1
