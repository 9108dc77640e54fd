"""The ``albert`` command line. Each sub-command lives in its own module with a ``register``.

User mistakes (:class:`~pyalbert.errors.AlbertError`) print one paragraph and exit non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pyalbert import __version__
from pyalbert.entry import exit_code

#: modules under pyalbert.cli, each with ``register(subparsers)``
COMMAND_MODULES = (
    "config_cmd",
    "setup_cmd",
    "whitelist_cmd",
    "api_cmd",
    "smoke_cmd",
    "image_cmd",
    "client_cmd",
    "testhost_cmd",
    "supervise_cmd",
    "local_cmd",
    "hub_cmd",
    "top_cmd",
)
#: sub-commands the deploy runs on hosts while a model is out of rotation (``albert supervise
#: stop|start|status``): parsed alone, without importing every other command's module (the
#: config models among them: ~0.5 s of a restart's gap on a busy host, per call)
ALONE = {"supervise": "supervise_cmd"}


def common_env(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--env`` and ``--config-dir``: which environment, from which config folder."""
    parser.add_argument("--env", "-e", required=required, help="environment name (config/environments/NAME.toml)")
    parser.add_argument("--config-dir", type=path_arg, default=None, help="config folder (default: ./config or $ALBERT_CONFIG_DIR)")


def path_arg(value: str):
    from pathlib import Path

    return Path(value)


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert",
        description="Albert Deploy: serve open-weight LLMs behind an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"albert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(f"pyalbert.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    alone = ALONE.get(words[0]) if words else None
    parser = build_parser((alone,) if alone else COMMAND_MODULES)
    args = parser.parse_args(argv)
    return exit_code(lambda: int(args.func(args) or 0))


def run() -> None:
    sys.exit(main())
