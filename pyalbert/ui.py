"""Terminal output: rich on a terminal, plain lines in CI logs."""

from __future__ import annotations

import os
import sys

from rich.console import Console

#: GitLab sets CI=true; its job log is not a terminal but understands ANSI colours.
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

console = Console(highlight=False, force_terminal=True if IN_CI else None,
                  width=None if sys.stdout.isatty() else 160)
console_err = Console(stderr=True, highlight=False, force_terminal=True if IN_CI else None)


def interactive() -> bool:
    """A person is watching: progress bars make sense."""
    return sys.stderr.isatty() and not IN_CI
