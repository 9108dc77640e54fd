"""Pure command builders: each returns a :class:`~pyalbert.commands.base.Cmd`, runs nothing."""

from pyalbert.commands.base import (
    Cmd,
    Op,
    Raw,
    Secret,
    any_of,
    chain,
    combine,
    group,
    pipe,
    sh,
    sudo,
    write_file,
)

__all__ = ["Cmd", "Op", "Raw", "Secret", "any_of", "chain", "combine", "group", "pipe", "sh", "sudo", "write_file"]
