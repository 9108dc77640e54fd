"""The hosts of a Ray group deploy together (issue 17).

A model split over a host group runs one release on all of its hosts or on none: a host of the
group records its release only once every other host of the group in this deploy got there too.
When one of them fails, the others that are still waiting roll back with it (their own undo), so
the group is never left split between two releases.

Shared by the hosts' threads of one deploy, like :class:`~pyalbert.engine.vllm_replace.ModelRoll`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

from pyalbert.engine.fanout import Interrupted
from pyalbert.errors import AlbertError
from pyalbert.runtimes.base import Unit


class GroupGate:
    """group (its Ray node unit's name) -> the hosts of this deploy that run a node of it."""

    def __init__(self, members: dict[str, frozenset[str]]):
        self.members = {g: hosts for g, hosts in members.items() if len(hosts) > 1}
        self._cond = threading.Condition()
        self._ready: dict[str, set[str]] = defaultdict(set)
        self._failed: dict[str, dict[str, str]] = defaultdict(dict)

    @classmethod
    def of(cls, host_plans: Iterable) -> GroupGate:
        members: dict[str, set[str]] = defaultdict(set)
        for hp in host_plans:
            for u in hp.units:
                if isinstance(u, Unit) and u.service == "ray":
                    members[u.name].add(hp.host.name)
        return cls({g: frozenset(h) for g, h in members.items()})

    def groups_of(self, host: str) -> list[str]:
        return sorted(g for g, hosts in self.members.items() if host in hosts)

    def failed(self, host: str, why: str) -> None:
        """``host`` will not record this release: its groups' other hosts roll back."""
        with self._cond:
            for g in self.groups_of(host):
                self._failed[g].setdefault(host, (why or "failed").splitlines()[0][:200])
            self._cond.notify_all()

    def arrive(self, host: str) -> None:
        """``host`` runs this release already (nothing to record, nothing to wait for)."""
        with self._cond:
            for g in self.groups_of(host):
                self._ready[g].add(host)
            self._cond.notify_all()

    def wait_all(self, host: str, cancel: threading.Event) -> None:
        """``host`` is ready to record: wait until every host of its groups is, or raise (this
        host then rolls back) when one of them failed. Bounded by the others' own deploys, which
        end (ready, failed or timed out) or are interrupted."""
        groups = self.groups_of(host)
        if not groups:
            return
        self.arrive(host)
        with self._cond:
            while True:
                failures = [(g, h, why) for g in groups for h, why in self._failed[g].items()]
                if failures:
                    raise AlbertError(group_failure(host, failures))
                if all(self._ready[g] >= self.members[g] for g in groups):
                    return
                if cancel.is_set():
                    raise Interrupted(f"interrupted (Ctrl-C) while waiting for the hosts of "
                                      f"{', '.join(groups)}")
                self._cond.wait(0.2)


def group_failure(host: str, failures: Sequence[tuple[str, str, str]]) -> str:
    g, other, why = failures[0]
    return (f"host {host}: {other} of the same host group ({g}) failed ({why}); this host rolls "
            "back with it, so the group runs one release. Fix what failed there, then deploy again.")
