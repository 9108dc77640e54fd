"""Terminal output: rich on a terminal, plain lines in CI logs, colours where the log shows them."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}


#: any CI (CI=true): no progress bars, no prompts
IN_CI = _flag("CI") or _flag("GITLAB_CI")
#: GitLab's job log is not a terminal but renders ANSI colours; other CI logs get plain text
COLOUR_LOG = _flag("GITLAB_CI") and not os.environ.get("NO_COLOR")

console = Console(highlight=False, force_terminal=True if COLOUR_LOG else None,
                  width=None if sys.stdout.isatty() else 160)
console_err = Console(stderr=True, highlight=False, force_terminal=True if COLOUR_LOG else None)


def interactive() -> bool:
    """A person is watching: progress bars make sense."""
    return sys.stderr.isatty() and not IN_CI
