"""What a run takes from its surroundings, read once by the entry point (never at import).

``RunContext.from_environ()`` reads who runs (``GITLAB_USER_LOGIN``), the pipeline
(``CI_PIPELINE_ID``), the readiness poll interval (``ALBERT_READY_POLL_S``) and the free disk a host
needs (``ALBERT_MIN_FREE_MIB``); ``SshMaterial`` (:mod:`pyalbert.remote`) the SSH key and known
hosts. Tests build both directly.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RunContext:
    who: str
    pipeline: str | None = None
    poll_s: float = 0.5
    min_free_mib: int = 1024
    clock: Callable[[], datetime] = field(default=utc_now, compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RunContext:
        env = os.environ if environ is None else environ
        user = env.get("GITLAB_USER_LOGIN") or getpass.getuser()
        return cls(who=f"{user}@{socket.gethostname()}", pipeline=env.get("CI_PIPELINE_ID") or None,
                   poll_s=float(env.get("ALBERT_READY_POLL_S", "0.5")),
                   min_free_mib=int(env.get("ALBERT_MIN_FREE_MIB", "1024")))

    def now_iso(self) -> str:
        return self.clock().isoformat(timespec="seconds")

    @property
    def lease_holder(self) -> str:
        """The pipeline a GPU lease is taken for (a local run: ``local-<who>``)."""
        return self.pipeline or f"local-{self.who}"
