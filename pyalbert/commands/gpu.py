"""GPU lease for hosts shared between pipelines (``link-gpu`` / ``unlink-gpu``).

The lease is a JSON file on the host: who holds the GPUs, for which pipeline, until when. Taking it
is guarded by an atomic ``mkdir`` (like the deploy lock) so two pipelines cannot both win. The
decision (take, renew, refuse) is a pure function of the lease read and the clock.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from pyalbert.commands.base import Cmd, Op, any_of, combine


def lease_path(base_dir: str) -> str:
    return f"{base_dir}/gpu-lease.json"


@dataclass(frozen=True)
class Lease:
    env: str
    who: str
    pipeline: str
    expires: str  # ISO 8601, UTC

    def expired(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.expires) <= now

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return f"pipeline {self.pipeline} of {self.who} (env {self.env}) until {self.expires}"


def new_lease(env: str, who: str, pipeline: str, minutes: int, now: datetime | None = None) -> Lease:
    now = now or datetime.now(timezone.utc)
    return Lease(env, who, pipeline, (now + timedelta(minutes=minutes)).isoformat(timespec="seconds"))


def parse_lease(stdout: str) -> Lease | None:
    try:
        data = json.loads(stdout)
        return Lease(str(data["env"]), str(data["who"]), str(data["pipeline"]), str(data["expires"]))
    except (ValueError, KeyError, TypeError):
        return None


Decision = Literal["take", "renew", "takeover", "refuse"]


def decide(current: Lease | None, pipeline: str, now: datetime) -> Decision:
    """take (free), renew (ours), takeover (expired), refuse (another live pipeline)."""
    if current is None:
        return "take"
    if current.pipeline == pipeline:
        return "renew"
    if current.expired(now):
        return "takeover"
    return "refuse"


def read(base_dir: str) -> Cmd:
    """The lease JSON; empty output when there is none."""
    return any_of(Cmd.of("cat", lease_path(base_dir), Op("2>/dev/null")), Cmd.of("true"))


def write(base_dir: str, lease: Lease, expected_pipeline: str | None) -> Cmd:
    """Write the lease only if the file still names ``expected_pipeline`` (None: no lease).

    Compare-and-swap under an atomic ``mkdir`` guard: exit 3 when someone changed it meanwhile.
    """
    path = shlex.quote(lease_path(base_dir))
    guard = shlex.quote(f"{base_dir}/gpu-lease.lock")
    expect = shlex.quote(expected_pipeline or "")
    script = (
        f"mkdir -p {shlex.quote(base_dir)} && mkdir {guard} 2>/dev/null || exit 3; "
        f"trap 'rmdir {guard}' EXIT; "
        f"now=$(sed -n 's/.*\"pipeline\": \"\\([^\"]*\\)\".*/\\1/p' {path} 2>/dev/null); "
        f"[ \"$now\" = {expect} ] || exit 3; "
        f"umask 077 && cat > {path}.tmp && mv -f {path}.tmp {path}"
    )
    return Cmd.of("sh", "-c", script, stdin=lease.to_json())


def remove(base_dir: str) -> Cmd:
    return Cmd.of("rm", "-f", lease_path(base_dir))


def has_nvidia_smi() -> Cmd:
    return Cmd.of("sh", "-c", "command -v nvidia-smi >/dev/null")


def free_memory() -> Cmd:
    """Per GPU: ``index, free MiB, total MiB``."""
    return Cmd.of("nvidia-smi", "--query-gpu=index,memory.free,memory.total",
                  "--format=csv,noheader,nounits")


def parse_free_memory(stdout: str) -> dict[int, tuple[int, int]]:
    """``{gpu index: (free MiB, total MiB)}``."""
    out: dict[int, tuple[int, int]] = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return out


def shortfalls(free: dict[int, tuple[int, int]], need: dict[int, float]) -> list[str]:
    """GPUs whose free memory is below the fraction of their total the plan needs there.

    ``free``: :func:`parse_free_memory`; ``need``: {gpu index: summed ``gpu_mem_use``}. A GPU the
    plan needs but ``nvidia-smi`` does not list is reported too (wrong index, or a lost GPU).
    """
    out = []
    for g, frac in sorted(need.items()):
        if g not in free:
            out.append(f"GPU {g}: not listed by nvidia-smi (it lists {sorted(free) or 'none'})")
            continue
        avail, total = free[g]
        wanted = int(frac * total)
        if avail < wanted:
            out.append(f"GPU {g}: {avail} MiB free, {wanted} MiB needed")
    return out


def hook(command: str, env: dict[str, str]) -> Cmd:
    """Run a configured provider hook (trusted config text) with lease details in its env."""
    return combine(Cmd.of("env", [f"{k}={v}" for k, v in sorted(env.items())], "sh", "-c", command))
