"""``albert local up|down``: the whole product on this machine (root, Linux)."""

from __future__ import annotations

import argparse
import os

from pyalbert.errors import AlbertError


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import path_arg

    parser = sub.add_parser("local", help="the local environment: one machine, no GPU")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="host, provision, setup, deploy vllm and api, smoke test")
    up.add_argument("--no-provision", action="store_true", help="skip utils/init_vm.sh")
    down = actions.add_parser("down", help="stop the services and the host")
    down.add_argument("--purge", action="store_true", help="also delete the host's state")
    for action in (up, down):
        action.add_argument("--config-dir", type=path_arg, default=None)
        action.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pyalbert.devtools.localenv import LocalEnv
    from pyalbert.ui import console

    if os.geteuid() != 0:
        raise AlbertError("albert local needs root (it makes a network namespace host). Fix: "
                          "run it with sudo.")
    local = LocalEnv(args.config_dir)
    if args.action == "up":
        local.up(provision=not args.no_provision)
    else:
        done = local.down(purge=args.purge)
        console.print("local environment: " + (", ".join(done) or "already down"))
    return 0
