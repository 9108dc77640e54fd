"""The exception tree. Every error a user can cause is an :class:`AlbertError`.

The CLI prints an ``AlbertError`` as one paragraph and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class AlbertError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one file, at one key."""

    file: str
    key: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: key '{self.key}'" if self.key else self.file
        text = f"{where}: {self.message}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


class ConfigError(AlbertError):
    """The configuration is invalid; nothing was touched."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return f"Invalid configuration: {self.problems[0]}"
        lines = [f"Invalid configuration ({len(self.problems)} problems):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class RemoteError(AlbertError):
    """A command failed on a host."""

    exit_code = 3
