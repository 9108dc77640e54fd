"""Commands as data: a :class:`Cmd` is a shell command built by a pure function.

Builders return ``Cmd`` values; only :mod:`pyalbert.remote` executes them. ``render()`` gives the
string a shell runs (secrets revealed), ``display()`` the one logs and ``--dry-run`` show (secrets
as ``***``). Combinators join commands like Kamal's: :func:`combine` (``&&``), :func:`chain`
(``;``), :func:`pipe` (``|``), :func:`any_of` (``||``).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Secret:
    """A value that must never be printed: rendered for the shell, masked everywhere else."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class Op:
    """A shell operator or redirection, emitted unquoted (``&&``, ``|``, ``>``, ``2>&1``)."""

    text: str


@dataclass(frozen=True)
class Raw:
    """Trusted shell text emitted as is (``$HOME``, a glob). Never built from user input."""

    text: str


Token = Union[str, Secret, Op, Raw]  # noqa: UP007 (a runtime alias)
Arg = Union[Token, int, float, "Cmd", None, bool, Iterable["Arg"]]


def _flatten(parts: Iterable[Arg]) -> list[Token]:
    out: list[Token] = []
    for part in parts:
        if part is None or part is False or part is True:
            continue  # optional flags: ("--detach" if detach) -> None drops out
        if isinstance(part, (str, Secret, Op, Raw)):
            out.append(part)
        elif isinstance(part, (int, float)):
            out.append(str(part))
        elif isinstance(part, Cmd):
            out.extend(part.tokens)
        else:
            out.extend(_flatten(part))
    return out


def _quote(token: Token, reveal: bool) -> str:
    if isinstance(token, Op | Raw):
        return token.text
    if isinstance(token, Secret):
        return shlex.quote(token.value) if reveal else "***"
    return shlex.quote(token)


@dataclass(frozen=True)
class Cmd:
    tokens: tuple[Token, ...]
    #: data sent on the command's standard input (file contents, secrets: never in argv)
    stdin: str | Secret | None = None

    @classmethod
    def of(cls, *parts: Arg, stdin: str | Secret | None = None) -> Cmd:
        """``Cmd.of("docker", "run", ("--detach" if d else None), ["-p", "80:80"])``."""
        return cls(tuple(_flatten(parts)), stdin)

    def render(self) -> str:
        return " ".join(_quote(t, reveal=True) for t in self.tokens)

    def display(self) -> str:
        text = " ".join(_quote(t, reveal=False) for t in self.tokens)
        if self.stdin is not None:
            size = len(self.stdin.value if isinstance(self.stdin, Secret) else self.stdin)
            text += f" <<< [{'secret, ' if isinstance(self.stdin, Secret) else ''}{size} bytes]"
        return text

    @property
    def stdin_text(self) -> str | None:
        return self.stdin.value if isinstance(self.stdin, Secret) else self.stdin

    @property
    def has_secret(self) -> bool:
        return any(isinstance(t, Secret) for t in self.tokens)

    def __str__(self) -> str:  # logs get the masked form by default
        return self.display()

    def __bool__(self) -> bool:
        return bool(self.tokens)


def _join(op: str, cmds: Iterable[Cmd | None]) -> Cmd:
    kept = [c for c in cmds if c]
    if sum(c.stdin is not None for c in kept) > 0 and len(kept) > 1:
        raise ValueError("a command with stdin cannot be joined with others: run it on its own")
    tokens: list[Token] = []
    for i, cmd in enumerate(kept):
        if i:
            tokens.append(Op(op))
        tokens.extend(cmd.tokens)
    return Cmd(tuple(tokens))


def combine(*cmds: Cmd | None) -> Cmd:
    """Run each while the previous succeeded (``a && b``)."""
    return _join("&&", cmds)


def chain(*cmds: Cmd | None) -> Cmd:
    """Run each regardless (``a ; b``)."""
    return _join(";", cmds)


def pipe(*cmds: Cmd | None) -> Cmd:
    return _join("|", cmds)


def any_of(*cmds: Cmd | None) -> Cmd:
    """First that succeeds (``a || b``)."""
    return _join("||", cmds)


def group(cmd: Cmd) -> Cmd:
    """``{ cmd ; }``: so an ``||`` or redirection applies to the whole."""
    return Cmd((Op("{"), *cmd.tokens, Op(";"), Op("}")))


def sh(cmd: Cmd) -> Cmd:
    """``sh -c '<cmd>'``: for ``sudo`` or a runner that takes one argv. Secrets stay masked."""
    inner = cmd.render()
    return Cmd.of("sh", "-c", Secret(inner) if cmd.has_secret else inner, stdin=cmd.stdin)


def sudo(cmd: Cmd) -> Cmd:
    """``sudo -n <argv>``, or ``sudo -n sh -c '<cmd>'`` for a compound command.

    ``-n`` never prompts: a missing sudo rule fails at once instead of hanging a pipeline.
    """
    simple = not any(isinstance(t, Op | Raw) for t in cmd.tokens)
    return Cmd.of("sudo", "-n", cmd if simple else sh(cmd), stdin=cmd.stdin)


def write_file(path: str, content: str | Secret, *, mode: str = "0644") -> Cmd:
    """Write ``content`` (sent on stdin, never in argv) to ``path`` atomically with ``mode``.

    The temp file is created under umask 077, so a secret is never readable, even briefly.
    """
    q = shlex.quote(path)
    script = f"umask 077 && cat > {q}.tmp && chmod {mode} {q}.tmp && mv -f {q}.tmp {q}"
    return Cmd.of("sh", "-c", script, stdin=content)
