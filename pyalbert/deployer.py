"""Runs host plans (``pyalbert.plans``) through runners: hosts in parallel, one runner each.

Per host: preflight checks, the deploy lock, probe what runs, start only what changed (config
hash), wait until ready, record the release; on any failure (timeout, error, Ctrl-C) the units
already replaced go back to the previous release and the lock is released. Output lines are
prefixed with the host name; :func:`summary_table` prints the outcome of every host.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone

from rich.table import Table

from pyalbert.commands import health, lock, release
from pyalbert.errors import AlbertError
from pyalbert.plans import ApiSwap, Check, HostPlan, Unit, manifest, orphans, units_from_manifest
from pyalbert.remote import Runner
from pyalbert.ui import console

POLL_S = float(os.environ.get("ALBERT_READY_POLL_S", "0.5"))


class Interrupted(AlbertError):
    """Ctrl-C: every host undid its unfinished work; ``results`` says where each one ended."""

    exit_code = 130

    def __init__(self, message: str, results: Sequence[HostResult] = ()):
        super().__init__(message)
        self.results = list(results)


class NotReady(AlbertError):
    pass


def who() -> str:
    user = os.environ.get("GITLAB_USER_LOGIN") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class HostResult:
    host: str
    status: str = "pending"  # deployed | unchanged | failed | rolled back | ...
    release: str = ""
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("deployed", "unchanged", "rolled back to", "done", "ready")


class Printer:
    """Per-host prefixed lines, safe from several threads."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._lock = threading.Lock()

    def __call__(self, host: str, text: str, style: str = "") -> None:
        if self.quiet:
            return
        with self._lock:
            line = f"[bold cyan]\\[{host}][/] " + (f"[{style}]{text}[/]" if style else text)
            console.print(line, highlight=False, soft_wrap=True)


class HostDeploy:
    """Everything one host does in one deploy or rollback (runs in a worker thread)."""

    def __init__(self, runner: Runner, hp: HostPlan, out: Printer, cancel: threading.Event,
                 *, who: str, message: str = "", pipeline: str | None = None):
        self.r, self.hp, self.out, self.cancel = runner, hp, out, cancel
        self.who, self.message, self.pipeline = who, message, pipeline
        self.name = hp.host.name
        self.rt = hp.runtime
        self.undo: list[Callable[[], None]] = []
        self.result = HostResult(self.name, release=hp.release_id)
        self.prev_id: str | None = None  # known once the lock is held

    def say(self, text: str, style: str = "") -> None:
        self.out(self.name, text, style)

    # -- checks
    def preflight(self) -> None:
        problems = []
        for check in self.hp.checks:
            res = self.r.run(check.cmd, check=False)
            problem = verdict(check, res.exit_code, res.stdout, self.r, self.hp, stderr=res.stderr)
            if problem:
                problems.append(problem)
                if check.kind == "docker":
                    break
        if problems:
            raise AlbertError(f"host {self.name}: " + " ".join(problems))

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

    def take_lock(self) -> None:
        details = lock.details(who=self.who, when=now_iso(), release=self.hp.release_id,
                               message=self.message, pid=os.getpid(), pipeline=self.pipeline)
        if self.r.run(lock.acquire(self.hp.base_dir, details), check=False).ok:
            return
        holder = lock.describe_holder(self.r.run(lock.show(self.hp.base_dir), check=False).stdout)
        raise AlbertError(
            f"host {self.name} is locked by {holder}. Nothing was changed. Fix: wait for that "
            f"deploy to end, or if it died run `fab unlock --env {self.hp.env}`.")

    def state(self, unit: Unit) -> tuple[bool, str, str]:
        res = self.r.run(unit.probe, check=False)
        return self.rt.parse_state(res.stdout) if res.ok else (False, "", "")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Preflight, take the host's deploy lock, release it whatever happens."""
        self.preflight()
        self.take_lock()
        try:
            yield
        finally:
            self.r.run(lock.release(self.hp.base_dir), check=False)

    # -- the deploy
    def deploy(self) -> HostResult:
        t0 = time.monotonic()
        try:
            with self.locked():
                try:
                    self._deploy_locked()
                except BaseException as exc:
                    self._roll_back(exc)
                    raise
        except Interrupted as exc:
            self.result.status, self.result.error = "interrupted", str(exc)
        except AlbertError as exc:
            self.result.status = "failed" if self.result.status == "pending" else self.result.status
            self.result.error = str(exc)
        if not self.result.ok:  # the summary shows what serves now, not the release that failed
            self.result.release = (f"{self.prev_id} (previous)" if self.prev_id else
                                   "-" if self.prev_id is None else "(none)")
        self.result.seconds = time.monotonic() - t0
        return self.result

    def _previous(self) -> tuple[str, dict]:
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
        prev_id, prev_manifest = self._previous()
        self.prev_id = prev_id
        self.previous = {u.name if isinstance(u, Unit) else u.edge.name + "/api": u
                         for u in units_from_manifest(prev_manifest, self.rt)} if prev_manifest else {}
        started: dict[str, str] = {}
        todo: list[Unit | ApiSwap] = []
        for u in hp.units:
            probe_unit = u if isinstance(u, Unit) else None
            if probe_unit is not None:
                running, digest, rel = self.state(probe_unit)
                if running and digest == u.config_hash:
                    started[u.name] = rel or prev_id
                    continue
            else:
                same = self._api_unchanged(u)
                if same:
                    started.update(same)
                    continue
            todo.append(u)
        listing = self.r.run(self.rt.list_units(hp.env), check=False)
        gone = orphans(self.rt.parse_units(listing.stdout), hp) if listing.ok else []
        if not todo and not gone:
            self.say(f"nothing changed: {len(hp.units)} unit(s) already run this config; "
                     "restarted nothing", "green")
            self.result.status, self.result.release = "unchanged", prev_id
            return
        self.say(f"release {hp.release_id}: {len(todo)} unit(s) to start"
                 + (f", {len(gone)} to remove" if gone else ""))
        self.r.run(release.ensure_dir(hp.release_dir))
        for f in hp.files:
            self.r.run(f.cmd())
        for u in todo:
            self._check_cancel()
            if isinstance(u, ApiSwap):
                started.update(self._swap_api(u))
            else:
                self._replace(u)
                started[u.name] = hp.release_id
            self.result.changed.append(u.name if isinstance(u, Unit) else u.edge.name)
        for name in gone:
            self.say(f"removing {name} (no longer in the plan)")
            self.r.run(self.rt.stop(name))
        doc = manifest(hp, started, who=self.who, when=now_iso(), previous=prev_id or None)
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
        running, digest, rel = self.state(swap.edge)
        if not (running and digest == swap.edge.config_hash):
            return None
        for colour in swap.colours.values():
            c_running, c_digest, c_rel = self.state(colour)
            if c_running and c_digest == swap.config_hash:
                up = self.r.run(swap.read_upstream, check=False).stdout.strip()
                if up == str(colour.port):
                    return {swap.edge.name: rel, colour.name: c_rel}
        return None

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Interrupted(f"host {self.name}: interrupted (Ctrl-C)")

    def _replace(self, u: Unit) -> None:
        """Fixed port: stop the old server, start the new one, wait until ready."""
        self.say(f"starting {u.name} (config {u.config_hash})")
        old = self.previous.get(u.name)

        def undo() -> None:
            self.r.run(u.stop, check=False)
            if old is not None and old.config_hash != u.config_hash:
                self.say(f"rolling back {u.name} to its previous release")
                self.r.run(old.start, check=False)
                self.wait_ready(old, quiet=True)

        self.undo.append(undo)
        self.r.run(u.stop)
        for f in u.files:
            self.r.run(f.cmd())
        self.r.run(u.start)
        self.wait_ready(u)

    def _swap_api(self, swap: ApiSwap) -> dict[str, str]:
        """Edge first (when its own config changed), then the idle colour, switch, stop old."""
        started = {}
        hp = self.hp
        running, digest, rel = self.state(swap.edge)
        current = self.r.run(swap.read_upstream, check=False).stdout.strip()
        live = next((k for k, c in swap.colours.items() if str(c.port) == current), None)
        target = "green" if live == "blue" else "blue"
        new = swap.colours[target]
        self.say(f"starting {new.name} on 127.0.0.1:{new.port} (config {new.config_hash})")
        self.undo.append(lambda: self.r.run(new.stop, check=False))
        self.r.run(new.stop)
        self.r.run(new.start)
        self.wait_ready(new)
        if not (running and digest == swap.edge.config_hash):
            self.say(f"starting the edge {swap.edge.name} on port {swap.edge.port}")
            self.r.run(release.ensure_dir(swap.upstream_file.rsplit("/", 1)[0]))
            for f in swap.edge.files:
                self.r.run(f.cmd())
            self.r.run(swap.switch(target))
            self.r.run(swap.edge.stop)
            self.r.run(swap.edge.start)
            self.wait_port(swap.edge)
            started[swap.edge.name] = hp.release_id
        else:
            self.r.run(swap.switch(target))
            started[swap.edge.name] = rel
        self.undo.clear()  # the switch is done: the new api serves
        for k, c in swap.colours.items():
            if k != target:
                self.r.run(c.stop, check=False)  # graceful: in-flight requests finish
        started[new.name] = hp.release_id
        self.say(f"api switched to {target}", "green")
        return started

    def wait_port(self, u: Unit, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.r.run(health.port_listeners(u.port or 0), check=False).stdout.strip():
                return
            self.cancel.wait(0.1)
        raise NotReady(f"host {self.name}: {u.name} does not listen on port {u.port} after "
                       f"{timeout:g}s. Logs:\n{self._tail(u)}")

    def _tail(self, u: Unit) -> str:
        text = self.r.run(u.logs, check=False).stdout.strip().splitlines()[-20:]
        return "\n".join(f"    {line}" for line in text) or "    (no output)"

    def wait_ready(self, u: Unit, *, quiet: bool = False) -> None:
        """``/health`` is 200 then ``/v1/models`` lists the model; refused/503 are waited out."""
        if u.ready is None:
            return
        t0 = time.monotonic()
        deadline = t0 + self.hp.ready_timeout_s
        healthy, polls, last = False, 0, "no answer"
        while True:
            if not quiet:
                self._check_cancel()
            if not healthy:
                code = health.parse_status(self.r.run(u.ready.health(), check=False).stdout)
                healthy, last = code == 200, f"/health answered {code or 'nothing'}"
            if healthy:
                if u.ready.model is None:
                    break
                ids = health.models_listed(self.r.run(u.ready.models(), check=False).stdout)
                if u.ready.model in ids:
                    break
                last = f"/v1/models lists {ids or 'nothing'}"
            polls += 1
            if polls % 4 == 0:
                running, _, _ = self.state(u)
                restarts = self.rt.parse_restarts(self.r.run(self.rt.restarts(u.name),
                                                             check=False).stdout)
                if not running or restarts > 0:
                    raise NotReady(f"host {self.name}: {u.name} exited before it was ready. "
                                   f"Last log lines:\n{self._tail(u)}")
            if time.monotonic() > deadline:
                raise NotReady(
                    f"host {self.name}: {u.name} was not ready after {self.hp.ready_timeout_s:g}s "
                    f"({last}). Fix: read the log lines below; raise deploy.ready_timeout_s if the "
                    f"model only loads slowly. Last log lines:\n{self._tail(u)}")
            if not quiet:
                self.cancel.wait(POLL_S)
            else:
                time.sleep(POLL_S)
        if not quiet:
            self.say(f"{u.name} ready in {time.monotonic() - t0:.1f}s")

    def _roll_back(self, exc: BaseException) -> None:
        if not self.undo:
            return
        why = "interrupted (Ctrl-C)" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
        self.say(f"{why}; rolling back {len(self.undo)} unit(s) to the previous release", "yellow")
        for step in reversed(self.undo):
            try:
                step()
            except Exception as err:  # noqa: BLE001 - keep undoing the others
                self.say(f"rollback step failed: {err}", "red")
        self.undo.clear()
        self.result.status = "rolled back"

    # -- rollback --to
    def rollback(self) -> HostResult:
        """Converge to the recorded release ``hp.release_id`` (files are already there)."""
        t0 = time.monotonic()
        try:
            with self.locked():
                self.previous = {}
                changed = 0
                for u in self.hp.units:
                    self._check_cancel()
                    if isinstance(u, ApiSwap):
                        if self._api_unchanged(u) is None:
                            self._swap_api(u)
                            changed += 1
                        continue
                    running, digest, _ = self.state(u)
                    if running and digest == u.config_hash:
                        continue
                    self.r.run(u.stop)
                    self.r.run(u.start)
                    self.wait_ready(u)
                    changed += 1
                self.r.run(release.set_current(self.hp.base_dir, self.hp.release_id))
                self.result.status = "rolled back to"
                self.say(f"release {self.hp.release_id} serves ({changed} unit(s) restarted)", "green")
        except AlbertError as exc:
            self.result.status = "interrupted" if isinstance(exc, Interrupted) else "failed"
            self.result.error = str(exc)
        self.result.seconds = time.monotonic() - t0
        return self.result


def docker_problem(code: int, output: str, user: str, env: str) -> str | None:
    """What ``docker version`` failing says: not installed, no access, or daemon down."""
    if code == 0:
        return None
    text = output.lower()
    fix = f"Fix: run `fab provision --env {env}`"
    if code == 127 or "command not found" in text or "docker: not found" in text:
        return (f"docker is not installed (the `docker` command is not found for user {user}). "
                f"{fix}: it installs Docker.")
    if "permission denied" in text:
        return (f"user {user} may not use docker (permission denied on the docker socket: not in "
                f"the docker group). {fix}: it adds {user} to the docker group.")
    if "cannot connect to the docker daemon" in text or "is the docker daemon running" in text:
        return (f"the docker daemon is not running. {fix}, or start it on the host "
                "(`sudo systemctl start docker`).")
    last = output.strip().splitlines()[-1:] or ["no output"]
    return (f"docker does not answer (exit {code}: {last[0][:200]}). {fix}: it installs and "
            "starts Docker and gives the user access to it.")


def verdict(check: Check, code: int, stdout: str, runner: Runner, hp: HostPlan,
            stderr: str = "") -> str | None:
    """Pure-ish reading of one preflight check; returns the problem sentence or None."""
    if check.kind == "docker":
        return docker_problem(code, stderr + "\n" + stdout, hp.host.user, hp.env)
    if check.kind == "tools":
        if code != 0:
            return (f"the tools venv is not on the host ({check.arg}). Fix: run "
                    f"`fab setup --env {hp.env}`: it installs pyalbert there.")
        return None
    if check.kind == "python":
        from pyalbert.commands.process import parse_python_version

        found = parse_python_version(stdout) if code == 0 else None
        wanted = tuple(int(x) for x in check.arg.split("."))
        if found is None or found < wanted:
            got = (f"is Python {'.'.join(map(str, found))}" if found else
                   "was not found on the host (or does not run)")
            return (f"{check.what.split('(')[-1].rstrip(')')} {got}, and vLLM needs Python "
                    f"{check.arg} or newer. Fix: install python3.10+ with its venv module (fab "
                    "provision does), or set vllm.python in the environment file.")
        return None
    if check.kind == "model_dir":
        if code != 0:
            return (f"model {check.arg} is not on the host ({check.what.split(' is in ')[-1]}). "
                    f"Fix: run `fab setup --env {hp.env}` to download it.")
        return None
    if check.kind == "disk":
        free_mib = health.parse_free_kib(stdout) // 1024
        if code == 0 and free_mib < int(check.arg):
            return (f"not enough disk: {free_mib} MiB free under {hp.base_dir}, at least "
                    f"{check.arg} MiB needed. Fix: free space (old images: docker image prune; old "
                    "models under the storage dir) and deploy again.")
        return None
    if check.kind == "port":
        port, _, owner = check.arg.partition("=")
        if not stdout.strip():
            return None
        res = runner.run(hp.runtime.list_units(hp.env), check=False)
        ours = {r["name"] for r in hp.runtime.parse_units(res.stdout) if r["state"] == "running"}
        mine = {owner, *(n for n in ours if n.startswith(owner))}
        if ours & mine:
            return None
        listener = stdout.strip().splitlines()[0].split()[-1] if stdout.strip() else "?"
        return (f"port {port} is already taken by another process ({listener}), not by {owner}. "
                f"Fix: stop that process, or change the port in the configuration.")
    return None


def run_hosts(tasks: Sequence[tuple[str, Callable[[threading.Event], HostResult]]],
              ) -> list[HostResult]:
    """Run one callable per host in parallel; Ctrl-C sets the cancel event and waits for them
    to roll back and unlock, then raises :class:`Interrupted`."""
    cancel = threading.Event()
    interrupted = False
    with ThreadPoolExecutor(max_workers=max(1, len(tasks)), thread_name_prefix="host") as pool:
        futures = {pool.submit(fn, cancel): name for name, fn in tasks}
        pending = set(futures)
        while pending:
            try:
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            except KeyboardInterrupt:
                interrupted = True
                cancel.set()
                console.print("[yellow]interrupted: rolling back and releasing locks...[/]")
    results = []
    for fut, name in futures.items():
        try:
            results.append(fut.result())
        except AlbertError as exc:
            results.append(HostResult(name, "failed", error=str(exc)))
    if interrupted:
        raise Interrupted(interrupted_text(results), results)
    return results


def interrupted_text(results: Sequence[HostResult]) -> str:
    """One paragraph: where each host ended after Ctrl-C."""
    parts = []
    for r in results:
        if r.status in ("interrupted", "rolled back"):
            parts.append(f"{r.host} went back to its previous release")
        elif r.ok:
            parts.append(f"{r.host} had finished ({r.status})")
        else:
            parts.append(f"{r.host} {r.status}" + (f": {r.error.splitlines()[0]}" if r.error else ""))
    return ("interrupted (Ctrl-C): " + ("; ".join(parts) or "no host had started")
            + ". The deploy locks were released.")


def summary_table(results: Sequence[HostResult], title: str = "deploy") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("host", "result", "release", "changed", "time"):
        table.add_column(col)
    for r in results:
        style = "green" if r.ok else "red"
        table.add_row(r.host, f"[{style}]{r.status}[/]", r.release,
                      ", ".join(r.changed) or "-", f"{r.seconds:.1f}s")
    return table


# --- environment-level operations (what the fab tasks call) -------------------------------------

RunnerFactory = Callable[[object], Runner]


def ssh_runners(spec) -> RunnerFactory:
    from pyalbert.remote import SSHRunner

    return lambda host: SSHRunner(host, spec.env.ssh)


def new_release_id(spec) -> str:
    from pyalbert.plans import release_id

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    material = {"env": spec.env.model_dump(mode="json"), "models": spec.models.model_dump(mode="json")}
    return release_id(stamp, material)


def config_files(spec) -> dict[str, str]:
    """The environment file and routing table, as the api container's config folder."""
    env_rel = f"environments/{spec.env_file.name}"
    return {env_rel: spec.env_file.read_text(), spec.env.routing_table: spec.routing_file.read_text()}


def resolve_secrets(spec) -> dict[str, str]:
    out = {}
    for key in ("hf_token", "api_keys"):
        ref = spec.env.secrets.get(key)
        value = ref.resolve() if ref else None
        if value is not None:
            out[key] = value.get_secret_value()
    return out


def print_dry_run(host_plans: Sequence[HostPlan]) -> None:
    console.print("[bold]dry run[/]: nothing is connected to; commands as they would run "
                  "(secrets masked, probes decide at run time what is skipped)")
    for hp in host_plans:
        console.print(f"\n[bold cyan]{hp.host.name}[/] ({hp.host.user}@{hp.host.address}), "
                      f"release {hp.release_id}")
        for i, (what, cmds) in enumerate(hp.steps(), 1):
            console.print(f"  {i:2}. {what}", highlight=False)
            for cmd in cmds:
                console.print(f"        $ {cmd.display()}", highlight=False, markup=False,
                              soft_wrap=True)


def _runner_task(factory: RunnerFactory, hp: HostPlan, out: Printer, kind: str, **kw):
    def task(cancel: threading.Event) -> HostResult:
        runner = factory(hp.host)
        try:
            hd = HostDeploy(runner, hp, out, cancel, who=kw.get("who") or who(),
                            message=kw.get("message", ""), pipeline=os.environ.get("CI_PIPELINE_ID"))
            if kind == "check":
                return hd.check()
            return hd.deploy() if kind == "deploy" else hd.rollback()
        except AlbertError as exc:
            out(hp.host.name, str(exc), "red")
            return HostResult(hp.host.name, "failed", release=hp.release_id, error=str(exc))
        finally:
            close = getattr(runner, "close", None)
            if close:
                close()
    return task


def run_and_finish(tasks, title: str, out: Printer) -> list[HostResult]:
    """:func:`run_hosts` then :func:`finish`; after Ctrl-C the summary is printed too."""
    try:
        results = run_hosts(tasks)
    except Interrupted as exc:
        if not out.quiet:
            console.print(summary_table(exc.results, f"{title} (interrupted)"))
        raise
    return finish(results, title, out)


def finish(results: Sequence[HostResult], title: str, out: Printer) -> list[HostResult]:
    for r in results:
        if r.error:
            out(r.host, r.error, "red")
    if not out.quiet:
        console.print(summary_table(results, title))
    failed = [r for r in results if not r.ok]
    if failed:
        raise AlbertError(f"{title} failed on {len(failed)} of {len(results)} host(s): "
                          + ", ".join(f"{r.host} ({r.status})" for r in failed)
                          + ". The hosts listed kept (or went back to) their previous release.\n"
                          + "\n".join(r.error.splitlines()[0] for r in failed if r.error))
    return list(results)


def deploy_env(spec, *, service: str = "all", model: str | None = None, dry_run: bool = False,
               message: str = "", runners: RunnerFactory | None = None,
               quiet: bool = False, check: bool = False) -> list[HostResult]:
    """Deploy ``spec`` on its hosts in parallel; ``dry_run`` prints the plan and connects nowhere,
    ``check`` connects and runs only the preflight checks (nothing changes)."""
    from pyalbert.config import resolve_plan
    from pyalbert.plans import DeployInputs, deploy_plans

    plan = resolve_plan(spec)
    secrets = resolve_secrets(spec)
    if dry_run:
        secrets = {k: "***" for k in secrets}
    inputs = DeployInputs(release_id=new_release_id(spec), secrets=secrets,
                          config_files=config_files(spec), service=service, model=model)
    host_plans = deploy_plans(plan, inputs)
    if dry_run:
        print_dry_run(host_plans)
        return []
    out = Printer(quiet)
    factory = runners or ssh_runners(spec)
    kind = "check" if check else "deploy"
    return run_and_finish([(hp.host.name, _runner_task(factory, hp, out, kind, message=message))
                           for hp in host_plans], "preflight" if check else "deploy", out)


def list_releases(spec, runners: RunnerFactory | None = None) -> dict[str, tuple[str, list[dict]]]:
    """host -> (current id, [manifest summaries, oldest first])."""
    factory = runners or ssh_runners(spec)
    base = spec.env.deploy.base_dir

    def one(host):
        r = factory(host)
        try:
            cur = release.parse_current(r.run(release.current(base), check=False).stdout)
            ids = release.parse_ids(r.run(release.list_ids(base)).stdout)
            items = []
            for rid in ids:
                res = r.run(release.read_manifest(base, rid), check=False)
                try:
                    data = json.loads(res.stdout) if res.ok else {}
                except ValueError:
                    data = {}
                items.append({"id": rid, "created": data.get("created", "?"),
                              "who": data.get("who", "?"),
                              "units": len(data.get("units", [])), "manifest": data})
            return cur, items
        finally:
            getattr(r, "close", lambda: None)()

    with ThreadPoolExecutor(max_workers=max(1, len(spec.env.hosts))) as pool:
        futures = {h.name: pool.submit(one, h) for h in spec.env.hosts}
    return {name: fut.result() for name, fut in futures.items()}


def rollback_env(spec, *, to: str | None = None, runners: RunnerFactory | None = None,
                 quiet: bool = False) -> list[HostResult]:
    """Converge each host to release ``to`` (default: the one before the current)."""
    from pyalbert.plans import runtime_for

    listing = list_releases(spec, runners)
    factory = runners or ssh_runners(spec)
    out = Printer(quiet)
    tasks = []
    for host in spec.env.hosts:
        cur, items = listing[host.name]
        ids = [i["id"] for i in items]
        if not ids:
            continue
        if to:
            if to not in ids:
                raise AlbertError(f"host {host.name} has no release {to!r}. Fix: pick one of "
                                  f"{', '.join(ids)} (see `fab releases --env {spec.env.name}`).")
            target = to
        else:
            before = [i for i in ids if cur and i < cur]
            if not before:
                raise AlbertError(f"host {host.name} has no release before {cur or 'none'}: "
                                  "nothing to roll back to. Fix: pass --to RELEASE.")
            target = before[-1]
        data = next(i["manifest"] for i in items if i["id"] == target)
        rt = runtime_for(spec.env)
        hp = HostPlan(host=host, env=spec.env.name, base_dir=spec.env.deploy.base_dir,
                      release_id=target, checks=tuple(rt.checks()), files=(),
                      units=tuple(units_from_manifest(data, rt)),
                      ready_timeout_s=spec.env.deploy.ready_timeout_s,
                      keep_releases=spec.env.deploy.keep_releases, runtime=rt)
        tasks.append((host.name, _runner_task(factory, hp, out, "rollback")))
    if not tasks:
        raise AlbertError(f"no host of {spec.env.name} has a release yet: deploy first.")
    return run_and_finish(tasks, "rollback", out)


def on_hosts(spec, fn: Callable[[Runner, object], object], runners: RunnerFactory | None = None,
             hosts=None) -> dict[str, object]:
    """Run ``fn(runner, host)`` on every host in parallel; errors come back as AlbertError values
    (anything else is a bug and is raised)."""
    from pyalbert import fleet

    factory = runners or ssh_runners(spec)

    def work(host):
        r = factory(host)
        try:
            return fn(r, host)
        finally:
            getattr(r, "close", lambda: None)()

    outcomes = fleet.on_hosts(list(hosts if hosts is not None else spec.env.hosts), work)
    out: dict[str, object] = {}
    for o in outcomes:
        if o.error is not None and not isinstance(o.error, AlbertError):
            raise o.error
        out[o.host] = o.error if o.error is not None else o.value
    return out


def raise_errors(results: dict[str, object], what: str) -> None:
    errors = {h: v for h, v in results.items() if isinstance(v, AlbertError)}
    if errors:
        raise AlbertError(f"{what} failed on {len(errors)} of {len(results)} host(s): " + "; ".join(
            str(e) if str(e).startswith(f"host {h}") else f"{h}: {e}" for h, e in errors.items()))


def lock_env(spec, message: str = "", runners: RunnerFactory | None = None) -> None:
    details = lock.details(who=who(), when=now_iso(), release="(manual lock)", message=message,
                           pipeline=os.environ.get("CI_PIPELINE_ID"))
    base = spec.env.deploy.base_dir

    def one(r, host):
        if not r.run(lock.acquire(base, details), check=False).ok:
            holder = lock.describe_holder(r.run(lock.show(base), check=False).stdout)
            raise AlbertError(f"host {host.name} is already locked by {holder}.")
        return "locked"

    raise_errors(on_hosts(spec, one, runners), "lock")


def unlock_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    base = spec.env.deploy.base_dir

    def one(r, host):
        held = r.run(lock.show(base), check=False)
        r.run(lock.release(base))
        return "unlocked" if held.ok else "was not locked"

    results = on_hosts(spec, one, runners)
    raise_errors(results, "unlock")
    return results


def down_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    """Stop and remove every container of this environment (any service, any release)."""
    from pyalbert.plans import runtime_for

    rt = runtime_for(spec.env)

    def one(r, host):
        rows = rt.parse_units(r.run(rt.list_units(spec.env.name)).stdout)
        for row in rows:
            r.run(rt.stop(row["name"]))
        return [row["name"] for row in rows]

    results = on_hosts(spec, one, runners)
    raise_errors(results, "down")
    return results


def status_env(spec, runners: RunnerFactory | None = None) -> dict[str, object]:
    """host -> rows (container, image, release, ports, state, health) + GPU memory."""
    from pyalbert.commands import gpu
    from pyalbert.plans import runtime_for

    rt = runtime_for(spec.env)
    ports = {}
    for model_id, model in spec.models:
        ports[model_id] = (model.port, model_id)

    def one(r, host):
        rows = rt.parse_units(r.run(rt.list_units(spec.env.name)).stdout)
        for row in rows:
            row["health"] = "-"
            if row["state"] != "running":
                continue
            if row["service"] == "vllm" and row["model"] in ports:
                port, mid = ports[row["model"]]
            elif row["service"] == "edge":
                port, mid = spec.env.api.port, None
            else:
                continue
            code = health.parse_status(r.run(health.ReadyCheck(port, mid).health(), check=False).stdout)
            row["health"] = "ok" if code == 200 else f"http {code or 'refused'}"
        gpus = ""
        if r.run(gpu.has_nvidia_smi(), check=False).ok:
            mem = gpu.parse_free_memory(r.run(gpu.free_memory(), check=False).stdout)
            gpus = ", ".join(f"GPU{i} {f}/{t} MiB free" for i, (f, t) in sorted(mem.items()))
        return {"rows": rows, "gpus": gpus}

    return on_hosts(spec, one, runners)


# --- link-gpu / unlink-gpu ------------------------------------------------------------------------


def _gpu_hosts(spec):
    hosts = [h for h in spec.env.hosts_for("vllm") if h.gpus > 0]
    return hosts or spec.env.hosts_for("vllm")


def _pipeline() -> str:
    return os.environ.get("CI_PIPELINE_ID") or f"local-{who()}"


def _gpu_link_off(spec) -> str | None:
    if spec.env.gpu_link.enabled:
        return None
    return (f"GPU link is off for {spec.env.name} (environments/{spec.env.name}.toml: "
            "[gpu_link] enabled = false): nothing to do")


def _run_hook(r: Runner, host, which: str, command: str, env: dict[str, str]) -> None:
    from pyalbert.commands import gpu

    res = r.run(gpu.hook(command, env), check=False)
    if not res.ok:
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        raise AlbertError(
            f"host {host.name}: the {which} hook ({command!r}, gpu_link.{which}_hook) failed with "
            f"exit code {res.exit_code}: {' / '.join(tail) or '(no output)'}. Fix: make the hook "
            "work by hand on the host, then rerun the job (it is safe to rerun).")


def link_gpu_env(spec, runners: RunnerFactory | None = None,
                 now: datetime | None = None) -> dict[str, object]:
    """Take (or renew) this pipeline's lease; refuse while another live pipeline holds it.

    A takeover (expired lease) first stops the vLLM servers the dead pipeline left, so their
    GPU memory is free again. The free-memory check (when ``nvidia-smi`` exists) runs on take
    and takeover, not on renew (our own servers may already use the memory).
    """
    from pyalbert.commands import gpu
    from pyalbert.config import resolve_plan
    from pyalbert.plans import runtime_for

    off = _gpu_link_off(spec)
    if off:
        return {h.name: off for h in _gpu_hosts(spec)}
    link = spec.env.gpu_link
    base = spec.env.deploy.base_dir
    pipeline = _pipeline()
    plan = resolve_plan(spec)
    rt = runtime_for(spec.env)

    def one(r, host):
        now_ = now or datetime.now(timezone.utc)
        current = gpu.parse_lease(r.run(gpu.read(base)).stdout)
        decision = gpu.decide(current, pipeline, now_)
        if decision == "refuse":
            assert current is not None
            raise AlbertError(
                f"host {host.name}: the GPUs are leased to {current.describe()}; this is pipeline "
                f"{pipeline}. Nothing was changed. Fix: wait for that pipeline to end (its "
                "unlink-gpu job frees them) or for the lease to expire, then retry this job.")
        lease = gpu.new_lease(spec.env.name, who(), pipeline, link.lease_minutes, now_)
        expected = current.pipeline if current else None
        if not r.run(gpu.write(base, lease, expected), check=False).ok:
            raise AlbertError(f"host {host.name}: another pipeline changed the GPU lease at the "
                              "same moment. Fix: retry the job.")
        notes = []
        if decision == "takeover":
            rows = rt.parse_units(r.run(rt.list_units(spec.env.name)).stdout)
            left = [row["name"] for row in rows if row["service"] == "vllm"]
            for name in left:
                r.run(rt.stop(name))
            if left:
                notes.append(f"stopped {len(left)} vLLM server(s) it left")
        if decision != "renew" and r.run(gpu.has_nvidia_smi(), check=False).ok:
            smi = r.run(gpu.free_memory(), check=False)
            need: dict[int, float] = {}
            for inst in plan.vllm_on(host.name):
                for g in inst.gpu_ids:
                    need[g] = need.get(g, 0.0) + inst.model.gpu_mem_use
            short = (gpu.shortfalls(gpu.parse_free_memory(smi.stdout), need) if smi.ok else
                     [f"nvidia-smi failed (exit {smi.exit_code}): "
                      f"{(smi.stderr or smi.stdout).strip()[-200:] or 'no output'}"])
            if short:
                r.run(gpu.remove(base), check=False)
                raise AlbertError(
                    f"host {host.name}: not enough free GPU memory ({'; '.join(short)}). The "
                    "lease was not kept. Fix: stop whatever uses the GPUs (`nvidia-smi` shows "
                    "which process), or lower gpu_mem_use in the routing table, then rerun "
                    "link-gpu.")
            if need:
                notes.append(f"GPU memory checked on {len(need)} GPU(s)")
        if link.attach_hook:
            _run_hook(r, host, "attach", link.attach_hook,
                      {"ALBERT_ENV": spec.env.name, "ALBERT_HOST": host.name,
                       "ALBERT_PIPELINE": pipeline})
            notes.append("attach hook run")
        said = {"take": f"lease taken for pipeline {pipeline}",
                "renew": f"already linked: lease of pipeline {pipeline} renewed",
                "takeover": f"expired lease of {current.describe() if current else '?'} taken over "
                            f"for pipeline {pipeline}"}[decision]
        return f"{said} until {lease.expires}" + "".join(f"; {n}" for n in notes)

    results = on_hosts(spec, one, runners, hosts=_gpu_hosts(spec))
    raise_errors(results, "link-gpu")
    return results


def unlink_gpu_env(spec, runners: RunnerFactory | None = None,
                   now: datetime | None = None) -> dict[str, object]:
    """Stop this env's vLLM servers, release the lease if ours, run the detach hook.

    While another live pipeline holds the lease nothing is touched (its servers and its GPU stay).
    With no lease (a pipeline that failed before or during link-gpu) it still stops what is left
    and runs the detach hook, so rerunning it is always safe.
    """
    from pyalbert.commands import gpu
    from pyalbert.plans import runtime_for

    off = _gpu_link_off(spec)
    if off:
        return {h.name: off for h in _gpu_hosts(spec)}
    link = spec.env.gpu_link
    base = spec.env.deploy.base_dir
    pipeline = _pipeline()
    rt = runtime_for(spec.env)

    def one(r, host):
        now_ = now or datetime.now(timezone.utc)
        current = gpu.parse_lease(r.run(gpu.read(base)).stdout)
        if current is not None and gpu.decide(current, pipeline, now_) == "refuse":
            return (f"left alone: the GPUs are leased to {current.describe()} (not pipeline "
                    f"{pipeline}); its vLLM servers keep running and no detach hook was run")
        rows = rt.parse_units(r.run(rt.list_units(spec.env.name)).stdout)
        stopped = [row["name"] for row in rows if row["service"] == "vllm"]
        for name in stopped:
            r.run(rt.stop(name))
        if current is None:
            lease = "no lease held"
        else:
            r.run(gpu.remove(base))
            lease = ("lease released" if current.pipeline == pipeline
                     else f"expired lease of pipeline {current.pipeline} removed")
        if link.detach_hook:
            _run_hook(r, host, "detach", link.detach_hook,
                      {"ALBERT_ENV": spec.env.name, "ALBERT_HOST": host.name,
                       "ALBERT_PIPELINE": pipeline})
        hook = "; detach hook run" if link.detach_hook else ""
        if not stopped and current is None:
            return f"already unlinked: no vLLM server running, {lease}{hook}"
        return f"stopped {len(stopped)} vLLM server(s); {lease}{hook}"

    results = on_hosts(spec, one, runners, hosts=_gpu_hosts(spec))
    raise_errors(results, "unlink-gpu")
    return results
