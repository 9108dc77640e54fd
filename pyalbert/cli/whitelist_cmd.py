"""Sub-commands of this module are added by their own issue."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    del sub
