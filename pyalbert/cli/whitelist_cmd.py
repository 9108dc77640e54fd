"""``albert create_whitelist --env ENV`` (also ``create-whitelist``, ``whitelist create``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyalbert.ui import console, console_err


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert.cli import common_env

    def add_options(parser: argparse.ArgumentParser) -> None:
        common_env(parser)
        parser.add_argument("--output", "-o", type=Path, default=None,
                            help="file to write (default: whitelist.output of the environment, "
                                 "relative to the config folder)")
        parser.set_defaults(func=create_command)

    add_options(sub.add_parser(
        "create_whitelist", aliases=["create-whitelist"],
        help="build the whitelist of trusted URLs, e-mails and phones the api checks answers with",
    ))
    group = sub.add_parser("whitelist", help="whitelist of trusted URLs, e-mails and phones")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_options(actions.add_parser("create", help="same as `albert create_whitelist`"))


def create_command(args: argparse.Namespace) -> int:
    from pyalbert.config import load_spec
    from pyalbert.config.spec import display_path
    from pyalbert.whitelist.build import create_whitelist

    spec = load_spec(args.env, args.config_dir)
    result = create_whitelist(spec.env.whitelist, spec.config_dir, args.output,
                              env_file=display_path(spec.env_file))
    counts = result.document["counts"]
    summary = ", ".join(f"{n} {key}" for key, n in counts.items())
    sources = len(result.document["sources"])
    where = display_path(result.path)
    if result.changed:
        console.print(f"[green]wrote[/] {where}: {summary} from {sources} source file(s) "
                      f"(version {result.version})")
    else:
        console.print(f"[green]unchanged[/]: {where} already holds {summary} from {sources} "
                      f"source file(s) (version {result.version})")
    if not sum(counts.values()):
        console_err.print(f"[yellow]warning:[/] the whitelist of {args.env} is empty: with "
                          "whitelist_mode 'redact' every link, e-mail and phone number is removed. "
                          "Add whitelist.sources or allow_* entries to the environment file.")
    return 0
