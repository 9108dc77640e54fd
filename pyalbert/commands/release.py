"""Releases kept on a host: ``{base_dir}/releases/<id>/`` with rendered files and a manifest.

A release id sorts by time (``20250101-120000-<hash>``), so the newest is last in ``ls``.
``{base_dir}/current`` is a symlink to the release that serves.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from pyalbert.commands.base import Cmd, Op, Secret, any_of

MANIFEST = "manifest.json"


def releases_dir(base_dir: str) -> str:
    return f"{base_dir}/releases"


def release_dir(base_dir: str, release_id: str) -> str:
    return f"{releases_dir(base_dir)}/{release_id}"


def ensure_dir(path: str) -> Cmd:
    """``mkdir -p -m 0700``: release files may hold secrets."""
    return Cmd.of("mkdir", "-p", "-m", "0700", path)


def put(path: str, content: str, *, secret: bool = False) -> Cmd:
    """Write a rendered file (parent folders made 0700): 0600 when it holds secrets, else 0644.

    The content goes on stdin, never in argv; the temp file is made under umask 077.
    """
    q = shlex.quote(path)
    parent = shlex.quote(path.rsplit("/", 1)[0] or "/")
    mode = "0600" if secret else "0644"
    script = (f"umask 077 && mkdir -p {parent} && cat > {q}.tmp && chmod {mode} {q}.tmp && "
              f"mv -f {q}.tmp {q}")
    return Cmd.of("sh", "-c", script, stdin=Secret(content) if secret else content)


def list_ids(base_dir: str) -> Cmd:
    """Release ids, oldest first (empty output when none)."""
    return any_of(Cmd.of("ls", "-1", releases_dir(base_dir), Op("2>/dev/null")), Cmd.of("true"))


def parse_ids(stdout: str) -> list[str]:
    return sorted(line.strip() for line in stdout.splitlines() if line.strip())


def read_manifest(base_dir: str, release_id: str) -> Cmd:
    return Cmd.of("cat", f"{release_dir(base_dir, release_id)}/{MANIFEST}")


def set_current(base_dir: str, release_id: str) -> Cmd:
    """Point ``current`` at a release atomically (symlink + rename)."""
    link = shlex.quote(f"{base_dir}/current")
    target = shlex.quote(f"releases/{release_id}")
    return Cmd.of("sh", "-c", f"ln -sfn {target} {link}.tmp && mv -Tf {link}.tmp {link}")


def current(base_dir: str) -> Cmd:
    """The link target of ``current`` (``releases/<id>``; empty when none): see :func:`parse_current`."""
    return any_of(Cmd.of("readlink", f"{base_dir}/current"), Cmd.of("true"))


def parse_current(stdout: str) -> str:
    return stdout.strip().rstrip("/").rsplit("/", 1)[-1]


def prune(base_dir: str, release_ids: Sequence[str]) -> Cmd | None:
    """Remove these releases (None when there is nothing to remove)."""
    if not release_ids:
        return None
    return Cmd.of("rm", "-rf", [release_dir(base_dir, r) for r in release_ids])


def to_prune(ids: Sequence[str], keep: int, protect: Sequence[str] = ()) -> list[str]:
    """Pure: the releases beyond the newest ``keep`` that nothing in ``protect`` still uses."""
    ordered = sorted(ids)
    old = ordered[:-keep] if keep else ordered
    return [r for r in old if r not in set(protect)]
