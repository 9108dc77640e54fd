"""``albert supervise start|stop|status``: the venv runtime's process supervisor."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pyalbert import supervisor

    parser = sub.add_parser("supervise", help="run and keep processes alive without systemd")
    supervisor.build_parser(parser)
