"""The deploy lock: a folder holding a details file, made atomically (Kamal's design).

The rename onto the lock either creates it or fails because someone holds it: no race between two
deploys. The details say who, when, which release and why, so the loser can name the holder.
"""

from __future__ import annotations

import json
import shlex
from datetime import datetime

from pyalbert.commands.base import Cmd, Op, any_of


def lock_dir(base_dir: str) -> str:
    return f"{base_dir}/deploy.lock"


def details(*, who: str, when: str, release: str, message: str = "", pid: int | None = None,
            pipeline: str | None = None) -> str:
    return json.dumps({"who": who, "when": when, "release": release, "message": message,
                       "pid": pid, "pipeline": pipeline}, sort_keys=True)


def acquire(base_dir: str, details_json: str) -> Cmd:
    """Exit 0: the lock is ours. Non-zero: someone holds it (read :func:`show`).

    The details are written into a fresh folder first, then renamed onto the lock (``rename`` of a
    folder onto a non-empty one fails): a lock never exists without its details, even when the
    deployer is killed half-way (a stray ``.deploy.lock.*`` folder is all it can leave).
    """
    b, d = shlex.quote(base_dir), shlex.quote(lock_dir(base_dir))
    script = (f'mkdir -p {b} && t=$(mktemp -d {b}/.deploy.lock.XXXXXX) && '
              f'cat > "$t/details.json" && mv -T "$t" {d} 2>/dev/null '
              f'|| {{ rm -rf "$t"; exit 1; }}')
    return Cmd.of("sh", "-c", script, stdin=details_json)


def show(base_dir: str) -> Cmd:
    """The holder's details; exit 1 when unlocked."""
    return Cmd.of("cat", f"{lock_dir(base_dir)}/details.json", Op("2>/dev/null"))


def release(base_dir: str) -> Cmd:
    """Remove the lock; succeeds when it was not held."""
    return any_of(Cmd.of("rm", "-rf", lock_dir(base_dir)), Cmd.of("true"))


def age(when: str, now: datetime) -> str:
    """``12 min`` between an ISO time and ``now`` ("" when unreadable)."""
    try:
        then = datetime.fromisoformat(when)
        seconds = (now - then).total_seconds()
    except (TypeError, ValueError):
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def describe_holder(stdout: str, now: datetime | None = None) -> str:
    """One line naming the holder from :func:`show` output (and how old the lock is)."""
    try:
        data = json.loads(stdout)
    except ValueError:
        return "unknown holder (unreadable lock details)"
    old = age(str(data.get("when")), now) if now else ""
    text = (f"{data.get('who', '?')} since {data.get('when', '?')}{f' ({old} ago)' if old else ''} "
            f"(release {data.get('release', '?')}")
    if data.get("pid"):
        text += f", pid {data['pid']}"
    if data.get("pipeline"):
        text += f", pipeline {data['pipeline']}"
    text += ")"
    if data.get("message"):
        text += f": {data['message']}"
    return text
