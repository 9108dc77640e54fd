"""The per-host state machine of a deploy and a rollback (runs in a fan-out worker).

Deploy: preflight, the deploy lock, probe what runs, start only what changed (config hash), wait
until ready, record the release; on any failure (timeout, error, Ctrl-C) the units already
replaced go back to the previous release and the lock is released. Rollback converges to a
recorded release the same way. ``check`` runs the preflight only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Literal

from pyalbert.commands import release
from pyalbert.commands.base import Cmd
from pyalbert.engine.fanout import Interrupted, RunnerFactory
from pyalbert.engine.group_gate import GroupGate
from pyalbert.engine.host_plans import manifest, orphans, units_from_manifest
from pyalbert.engine.report import HostResult
from pyalbert.engine.session import HostSession
from pyalbert.engine.vllm_replace import Gateways, ModelRoll, VllmReplace
from pyalbert.errors import AlbertError
from pyalbert.runtimes import facts
from pyalbert.runtimes.base import ApiSwap, Unit

#: undone first, in this order: a group's PID-namespace holder (docker), then its Ray node, then
#: the rest in reverse. A node restored after the server on it: the server started on the failed
#: release's node and died; a holder restored after its node: the node joined the failed
#: release's holder (``--pid container:`` is pinned at create) and died with it.
UNDO_FIRST = ("ray-pid", "ray")


def undo_rank(step: Callable[[], None]) -> int:
    service = getattr(step, "service", None)
    return UNDO_FIRST.index(service) if service in UNDO_FIRST else len(UNDO_FIRST)


class HostDeploy(HostSession):
    """Everything one host does in one deploy or rollback."""

    def __init__(self, *args, runners: RunnerFactory | None = None, roll: ModelRoll | None = None,
                 gate: GroupGate | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        #: the hosts of a Ray group record their release together, or roll back together
        self.gate = gate
        self.undo: list[Callable[[], None]] = []
        self.prev_id: str | None = None  # known once the lock is held
        self.previous: dict[str, Unit | ApiSwap] = {}
        #: the gateways' routes (a replace without downtime) and the cross-host roll of replicas
        self.gateways = Gateways(self, runners)
        self.roll = roll
        #: planned vLLM unit name -> the slot that serves it (recorded in the manifest)
        self.serving: dict[str, Unit] = {}

    def check(self) -> HostResult:
        """Preflight only (``fab deploy --check``): every check runs, nothing changes."""
        t0 = time.monotonic()
        try:
            self.preflight()
            self.result.status = "ready"
            self.say("preflight passed: docker/python, disk, models, ports", "green")
        except AlbertError as exc:
            self.result.status, self.result.error = "failed", str(exc)
        self.result.seconds = time.monotonic() - t0
        return self.result

    # -- the deploy
    def deploy(self) -> HostResult:
        t0 = time.monotonic()
        try:
            with self.locked():
                try:
                    self._deploy_locked()
                except BaseException as exc:
                    if self.gate:  # before the undo: the group's other hosts undo at once too
                        self.gate.failed(self.name, str(exc))
                    self._roll_back(exc)
                    raise
        except Interrupted as exc:
            self.result.status, self.result.error = "interrupted", str(exc)
        except AlbertError as exc:
            self.result.status = "failed" if self.result.status == "pending" else self.result.status
            self.result.error = str(exc)
        if not self.result.ok and self.gate:  # e.g. the lock was refused
            self.gate.failed(self.name, self.result.error or self.result.status)
        if not self.result.ok:  # the summary shows what serves now, not the release that failed
            self.result.release = (f"{self.prev_id} (previous)" if self.prev_id else
                                   "-" if self.prev_id is None else "(none)")
        self.gateways.close()
        self.result.seconds = time.monotonic() - t0
        return self.result

    def recorded(self, name: str) -> Unit | None:
        """The previous release's unit of that name, either slot of a vLLM server."""
        for v in self.previous.values():
            if isinstance(v, Unit) and v.name == name:
                return v
            if isinstance(v, Unit) and v.slots is not None and v.slots.other.name == name:
                return v.slots.other
        return None

    def _read_previous(self) -> tuple[str, dict]:
        link = self.r.run(release.current(self.hp.base_dir), check=False).stdout
        prev = release.parse_current(link)
        if not prev:
            return "", {}
        res = self.r.run(release.read_manifest(self.hp.base_dir, prev), check=False)
        try:
            return prev, json.loads(res.stdout) if res.ok else {}
        except ValueError:
            return prev, {}

    def _deploy_locked(self) -> None:
        hp = self.hp
        prev_id, prev_manifest = self._read_previous()
        self.prev_id = prev_id
        self.previous = {u.name if isinstance(u, Unit) else u.edge.name + "/api": u
                         for u in units_from_manifest(prev_manifest, self.rt)} if prev_manifest else {}
        self.previous |= {u.edge.name: u.edge for u in list(self.previous.values()) if isinstance(u, ApiSwap)}
        started, todo = self._unchanged_and_todo(prev_id)
        stale = self._stale_files(started)
        gone = orphans(facts.units(self.r, self.rt, hp.env, check=False), hp)
        unrecorded = not todo and self._unrecorded(prev_manifest, started, prev_id)
        if not todo and not gone and not stale and not unrecorded:
            self.say(f"nothing changed: {len(hp.units)} unit(s) already run this config; "
                     "restarted nothing", "green")
            self.result.status, self.result.release = "unchanged", prev_id
            if self.gate:
                self.gate.arrive(self.name)
            return
        if unrecorded:  # a deploy died (kill -9) between its starts and its record
            self.say(f"every unit already runs this config but release {prev_id or '(none)'} "
                     "does not record it (a deploy died before recording its release); "
                     "recording it, restarting nothing", "yellow")
        self.say(f"release {hp.release_id}: {len(todo)} unit(s) to start"
                 + (f", {len(stale)} to reload" if stale else "")
                 + (f", {len(gone)} to remove" if gone else ""))
        self.r.run(release.ensure_dir(hp.release_dir))
        for f in hp.files:
            self.r.run(f.cmd())
        for u in todo:
            self.check_cancel()
            if isinstance(u, ApiSwap):
                started.update(self._swap_api(u))
            else:
                served = self._replace(u)
                started[served.name] = hp.release_id
            self.result.changed.append(u.name if isinstance(u, Unit) else u.edge.name)
        for u in stale:
            self._reload(u)
            started[u.name] = hp.release_id
            self.result.changed.append(u.name)
        for name in gone:
            self.say(f"removing {name} (no longer in the plan)")
            self.r.run(self.rt.stop(name))
        if self.gate:
            self.gate.wait_all(self.name, self.cancel)
        self._record(started, prev_id)

    def _unrecorded(self, prev_manifest: dict, started: dict[str, str], prev_id: str) -> bool:
        """True when the ``current`` release's manifest does not record the config hashes of the
        units this plan runs (what a deploy killed after its starts leaves)."""
        doc = manifest(self.hp, started, who="", when="", previous=prev_id or None,
                       serving=self.serving)
        recorded = {u.get("name"): u.get("config_hash") for u in prev_manifest.get("units", [])}
        return any(recorded.get(u["name"]) != u["config_hash"] for u in doc["units"])

    def _unchanged_and_todo(self, prev_id: str) -> tuple[dict[str, str], list[Unit | ApiSwap]]:
        """Units already running this config (name -> their release), and the others."""
        started: dict[str, str] = {}
        todo: list[Unit | ApiSwap] = []
        for u in self.hp.units:
            if isinstance(u, Unit):
                same = self._slot_unchanged(u)
                if same is not None:
                    started[same[0].name] = same[1] or prev_id
                    continue
            else:
                same = self._api_unchanged(u)
                if same:
                    started.update(same)
                    continue
            todo.append(u)
        return started, todo

    def _slot_unchanged(self, u: Unit) -> tuple[Unit, str] | None:
        """(the slot that runs ``u``'s config, its release) or None; a vLLM server's route is
        made to point at it when it does not already (convergence after an interrupted run)."""
        for slot in (u, *((u.slots.other,) if u.slots else ())):
            now = self.state(slot)
            if now.running and now.config_hash == slot.config_hash:
                if u.slots is not None:
                    self.serving[u.name] = slot
                    # a start that a killed run did not see through: ready before it is routed to
                    self.wait_ready(slot, quiet=True)
                    VllmReplace(self).settle(u, slot)
                return slot, now.release
        return None

    def _record(self, started: dict[str, str], prev_id: str) -> None:
        """Write the manifest, point ``current`` at the release, prune old releases."""
        hp = self.hp
        doc = manifest(hp, started, who=self.ctx.who, when=self.ctx.now_iso(),
                       previous=prev_id or None, serving=self.serving)
        self.r.run(release.put(f"{hp.release_dir}/{release.MANIFEST}", json.dumps(doc, indent=2)))
        self.r.run(release.set_current(hp.base_dir, hp.release_id))
        self.undo.clear()
        ids = release.parse_ids(self.r.run(release.list_ids(hp.base_dir)).stdout)
        protect = {*started.values(), prev_id, hp.release_id}
        pruned = release.to_prune(ids, hp.keep_releases, sorted(protect))
        if pruned:
            self.r.run(release.prune(hp.base_dir, pruned))
        self.result.status = "deployed"
        self.say(f"release {hp.release_id} serves" + (f" (pruned {len(pruned)} old)" if pruned else ""),
                 "green")

    def _api_unchanged(self, swap: ApiSwap) -> dict[str, str] | None:
        edge = self.state(swap.edge)
        if not (edge.running and edge.config_hash == swap.edge.config_hash):
            return None
        for colour in swap.colours.values():
            now = self.state(colour)
            if now.running and now.config_hash == swap.config_hash:
                up = self.r.run(swap.read_upstream, check=False).stdout.strip()
                if up == str(colour.port):
                    return {swap.edge.name: edge.release, colour.name: now.release}
        return None

    def _replace(self, u: Unit) -> Unit:
        """A vLLM server with a spare slot: beside the old one when the host has room, else in
        place with the gateway told (:mod:`pyalbert.engine.vllm_replace`); others: stop the old
        one, start the new one, wait until ready. Returns the unit that serves."""
        if u.slots is not None and self.hp.replace is not None:
            served = VllmReplace(self).run(u)
            self.serving[u.name] = served
            return served
        self.say(f"starting {u.name} (config {u.config_hash})")
        old = self.previous.get(u.name)

        def undo() -> None:
            self.r.run(u.stop, check=False)
            if isinstance(old, Unit) and old.config_hash != u.config_hash:
                self.say(f"rolling back {u.name} to its previous release")
                self.r.run(old.start, check=False)
                self.wait_ready(old, quiet=True)

        undo.service = u.service  # type: ignore[attr-defined]  # see _roll_back
        self.undo.append(undo)
        self.r.run(u.stop)
        for f in u.files:
            self.r.run(f.cmd())
        self._start(u)
        return u

    def _start(self, u: Unit, *, poll_s: float | None = None,
               warm: bool | None | Literal["probe"] = "probe", cmd: Cmd | None = None) -> None:
        """Start ``u`` (or run ``cmd``: its restart in place) and wait until ready (``poll_s``:
        see :meth:`wait_ready`); a vLLM server says whether its compile cache was warm (probed
        before the start, unless ``warm`` was probed earlier) and how long it took."""
        warm = facts.warm(self.r, u) if warm == "probe" else warm
        t0 = time.monotonic()
        self.r.run(cmd or u.start)
        self.wait_ready(u, poll_s=poll_s)
        if warm is not None:
            kind, seconds = "warm" if warm else "cold", time.monotonic() - t0
            self.result.starts[u.name] = (kind, seconds)
            self.say(f"{u.name}: {kind} start ({'compiled artefacts in' if warm else 'nothing compiled in'}"
                     f" its compile cache), ready in {seconds:.1f}s")

    # -- files reloaded in place (Unit.reload: Prometheus)
    def _stale_files(self, started: dict[str, str]) -> list[Unit]:
        """Units that run their command unchanged but read other files than this release's
        (the api's front door among them: a changed config or certificate is a reload)."""
        units = [u.edge if isinstance(u, ApiSwap) else u for u in self.hp.units]
        return [u for u in units if u.reload is not None
                and u.name in started and self._reads_other_files(u)]

    def _reads_other_files(self, u: Unit) -> bool:
        assert u.reload is not None
        return self.r.run(u.reload.probe, check=False).stdout.strip() != u.reload.digest

    def _reload(self, u: Unit) -> None:
        """Point ``u`` at this release's files and reload it (no restart); undo: the previous
        release's files, reloaded."""
        assert u.reload is not None
        self.say(f"reloading {u.name} in place: its files changed (files {u.reload.digest})")
        old = self.previous.get(u.name)
        if isinstance(old, Unit) and old.reload is not None:
            back = old.reload.apply
            self.undo.append(lambda: self.r.run(back, check=False))
        self.r.run(u.reload.apply)
        self.wait_ready(u)

    def _swap_api(self, swap: ApiSwap) -> dict[str, str]:
        """Edge first (when its own config changed), then the idle colour, switch, stop old."""
        edge = self.state(swap.edge)
        current = self.r.run(swap.read_upstream, check=False).stdout.strip()
        live = next((k for k, c in swap.colours.items() if str(c.port) == current), None)
        target = "green" if live == "blue" else "blue"
        new = swap.colours[target]
        self.say(f"starting {new.name} on 127.0.0.1:{new.port} (config {new.config_hash})")
        self.undo.append(lambda: self.r.run(new.stop, check=False))
        self.r.run(new.stop)
        self.r.run(new.start)
        self.wait_ready(new)
        started = {swap.edge.name: self._switch_edge(swap, target, edge, live)}
        self.undo.clear()  # the switch is done: the new api serves
        for k, c in swap.colours.items():
            if k != target:
                self.r.run(c.stop, check=False)  # graceful: in-flight requests finish
        started[new.name] = self.hp.release_id
        self.say(f"api switched to {target}", "green")
        return started

    def _switch_edge(self, swap: ApiSwap, target: str, edge: facts.UnitState,
                     live: str | None = None) -> str:
        """Switch the front door to ``target`` (HAProxy's runtime API: new requests go there at
        once, the old colour's finish); the front door is (re)started first when its own command
        or image changed, reloaded when only its files did. Returns the release it runs from.

        A front door that runs is switched first, before it reloads or restarts: its worker sends
        new requests to ``target`` at once and saves that state, which the next worker loads
        (server-state-file), so no worker of the new config ever routes to ``live`` (on the first
        deploy of the gateway on its unix socket, ``live`` is older and listens on TCP alone). A
        failure after that switch switches back to ``live`` before ``target`` stops (undo)."""
        same = edge.running and edge.config_hash == swap.edge.config_hash
        reload = same and swap.edge.reload is not None and self._reads_other_files(swap.edge)
        if edge.running:  # checked when it is the only switch (a front door to restart may be older)
            self.r.run(swap.switch(target), check=same and not reload)
            if live is not None:
                back = swap.switch(live)
                self.undo.append(lambda: self.r.run(back, check=False))
        if same and not reload:
            return edge.release
        if reload:
            self._reload(swap.edge)
            self.r.run(swap.switch(target))
            return self.hp.release_id
        self.say(f"starting the front door {swap.edge.name} on port {swap.edge.port}")
        self.r.run(release.ensure_dir(swap.upstream_file.rsplit("/", 1)[0]))
        for f in swap.edge.files:
            self.r.run(f.cmd())
        self.r.run(swap.edge.stop)
        self.r.run(swap.edge.start)
        self.wait_port(swap.edge)
        self.r.run(swap.switch(target))
        return self.hp.release_id

    def _roll_back(self, exc: BaseException) -> None:
        if not self.undo:
            return
        why = "interrupted (Ctrl-C)" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
        self.say(f"{why}; rolling back {len(self.undo)} unit(s) to the previous release", "yellow")
        broken: list[str] = []
        for step in sorted(reversed(self.undo), key=undo_rank):
            try:
                step()  # each waits until the previous release's unit is ready again
            except Exception as err:  # noqa: BLE001 - keep undoing the others
                self.say(f"rollback step failed: {err}", "red")
                broken.append(str(err))
        self.undo.clear()
        self.result.status = "rolled back"
        if broken:  # never "rolled back" while the previous release does not serve
            self.result.status = "failed"
            self.prev_id = None
            raise AlbertError(f"host {self.name}: rolled back but NOT serving: " + " ".join(broken)
                              + f"\n  (the deploy itself: {exc})") from exc

    # -- rollback --to
    def rollback(self) -> HostResult:
        """Converge to the recorded release ``hp.release_id`` (files are already there)."""
        t0 = time.monotonic()
        try:
            with self.locked():
                changed = sum(self._converge(u) for u in self.hp.units)
                self.r.run(release.set_current(self.hp.base_dir, self.hp.release_id))
                self.result.status = "rolled back to"
                self.say(f"release {self.hp.release_id} serves ({changed} unit(s) restarted)", "green")
        except AlbertError as exc:
            self.result.status = "interrupted" if isinstance(exc, Interrupted) else "failed"
            self.result.error = str(exc)
        self.gateways.close()
        self.result.seconds = time.monotonic() - t0
        return self.result

    def _converge(self, u: Unit | ApiSwap) -> int:
        """Restart ``u`` unless it already runs its recorded config; 1 when it was restarted."""
        self.check_cancel()
        if isinstance(u, ApiSwap):
            if self._api_unchanged(u) is not None:
                if u.edge.reload is not None and self._reads_other_files(u.edge):
                    self._reload(u.edge)  # the recorded release's front-door files
                    return 1
                return 0
            self._swap_api(u)
            return 1
        if u.slots is not None and self.hp.replace is not None:
            if self._slot_unchanged(u) is not None:
                return 0
            self._replace(u)
            return 1
        now = self.state(u)
        if now.running and now.config_hash == u.config_hash:
            if u.reload is not None and self._reads_other_files(u):
                self._reload(u)
                return 1
            return 0
        self.r.run(u.stop)
        self._start(u)
        return 1
