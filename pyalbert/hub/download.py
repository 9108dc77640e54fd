"""``download_models``: the routing table's models, from the hub to ``DIR/<model id>``.

Per model: check the installed manifest (no network) -> ask the hub for the commit and file
metadata -> plan (what to fetch, what to reuse from the installed copy, what a previous run
left in the partial dir) -> check disk space for everything -> fetch into the partial dir ->
verify -> write the manifest -> swap into place. Models run concurrently (bounded).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyalbert import __version__
from pyalbert.config.routing import ModelSpec
from pyalbert.config.spec import DeploymentSpec
from pyalbert.hub import layout, remote
from pyalbert.hub.errors import (
    ChecksumMismatch,
    DownloadsFailed,
    HubError,
    NotEnoughSpace,
    OfflineMissing,
    UnsafeFileName,
)
from pyalbert.hub.manifest import FileEntry, Manifest, check_installed, write_manifest
from pyalbert.hub.progress import NullReporter, Reporter, human_bytes
from pyalbert.hub.selection import select_files, selection_key
from pyalbert.hub.verify import check_file

Status = Literal["downloaded", "updated", "up-to-date", "failed"]
#: kept free on top of what a download needs (filesystem metadata, logs, other writers)
DISK_RESERVE_BYTES = 64 * 1024 * 1024
DEFAULT_REVISION = "main"


@dataclass
class ModelResult:
    model_id: str
    repo: str
    revision: str
    path: Path
    status: Status
    commit: str = ""
    files: int = 0
    files_fetched: int = 0
    files_reused: int = 0
    bytes_total: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    error: str = ""
    exception: HubError | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_fetched / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DownloadPlan:
    """What one model needs, decided before any byte is written."""

    where: remote.Where
    model: ModelSpec
    commit: str
    files: dict[str, FileEntry]  # selected, with expected size/hash
    skipped: list[str]
    partial: Path
    fetch: list[str] = field(default_factory=list)
    reuse: dict[str, Path] = field(default_factory=dict)  # path -> identical file of the installed copy
    resumed: list[str] = field(default_factory=list)  # complete in the partial dir already
    previous: Manifest | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def fetch_bytes(self) -> int:
        return sum(self.files[p].size for p in self.fetch)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def _content_key(entry: FileEntry) -> tuple | None:
    if entry.sha256:
        return ("sha256", entry.sha256, entry.size)
    if entry.blob_id:
        return ("blob", entry.blob_id, entry.size)
    return None


def check_names(where: remote.Where, names: Iterable[str], folders: Iterable[Path]) -> None:
    """Refuse the repo if a file name could reach outside the model folder: by its spelling
    (``..``, absolute, backslash, see :func:`layout.unsafe_name`) or, once joined to one of
    ``folders`` (the download and install dirs), through a symlink on the way."""
    names, folders = list(names), list(folders)
    for name in names:
        why = layout.unsafe_name(name)
        if not why:
            escaped = [f for f in folders if not layout.resolves_inside(f, name)]
            why = f"{escaped[0] / name} resolves outside {escaped[0]}" if escaped else ""
        if why:
            raise UnsafeFileName(
                f"model '{where.model_id}' ({where.repo_at}, {where.routing_file}): the hub at "
                f"{remote.endpoint()} lists a file named {name!r} in {where.repo} ({why}): it would "
                f"be written outside the model folder {where.target}. Nothing was downloaded, "
                "reused, verified or deleted. Fix: make sure HF_ENDPOINT is a hub you trust (a "
                "mirror or proxy on the way may be compromised); pin 'revision' to a commit without "
                "this file, and report it to the repo's owners.")


def make_plan(where: remote.Where, model: ModelSpec, repo: remote.RemoteRepo,
              paths: layout.ModelPaths, installed: Manifest | None) -> DownloadPlan:
    """Split the selected files into fetch / reuse / resumed (reads the disk, no network).

    Raises :class:`UnsafeFileName` first, before any file is looked at, if a name from the hub
    could reach outside the model folder."""
    check_names(where, repo.files, [])
    kept, skipped = select_files(model, repo.files)
    check_names(where, kept, [paths.partial(repo.commit), paths.target])
    files = {p: repo.files[p] for p in kept}
    plan = DownloadPlan(where, model, repo.commit, files, skipped, paths.partial(repo.commit),
                        previous=installed)
    old_by_content: dict[tuple, Path] = {}
    if installed is not None:
        for path, entry in installed.files.items():
            key = _content_key(entry)
            # a manifest names what was installed, but only names that stay inside are sources
            if key is not None and not layout.unsafe_name(path) and layout.resolves_inside(paths.target, path):
                old_by_content.setdefault(key, paths.target / path)
    for path, entry in files.items():
        in_partial = plan.partial / path
        if _size_is(in_partial, entry.size):
            plan.resumed.append(path)
            continue
        key = _content_key(entry)
        old = old_by_content.get(key) if key else None
        if old is not None and _size_is(old, entry.size):
            plan.reuse[path] = old
        else:
            plan.fetch.append(path)
    return plan


def _size_is(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size and path.is_file()
    except OSError:
        return False


def check_disk_space(plans: Iterable[DownloadPlan], storage_dir: Path, free: int | None = None) -> None:
    plans = [p for p in plans if p.fetch_bytes]
    needed = sum(p.fetch_bytes for p in plans)
    if not plans:
        return
    free = layout.free_space(storage_dir) if free is None else free
    if needed + DISK_RESERVE_BYTES <= free:
        return
    detail = ", ".join(f"{p.where.model_id} {human_bytes(p.fetch_bytes)}" for p in plans)
    raise NotEnoughSpace(
        f"not enough disk space in {storage_dir}: the download needs {human_bytes(needed)} "
        f"({detail}) plus a {human_bytes(DISK_RESERVE_BYTES)} reserve, and {human_bytes(free)} "
        "is free. Nothing was downloaded. Fix: free space there (old models, stale "
        f"'.*.partial-*' directories), or pass --storage-dir on a larger disk.")


class Downloader:
    """One call of :func:`download_models` (state shared by its worker threads)."""

    def __init__(self, spec: DeploymentSpec, storage_dir: Path, *, token: str | None,
                 refresh: bool, max_parallel: int, files_per_model: int, reporter: Reporter):
        self.spec, self.storage_dir, self.token = spec, storage_dir, token
        self.refresh, self.max_parallel, self.files_per_model = refresh, max_parallel, files_per_model
        self.reporter = reporter
        self.active: dict[str, tuple[Path, int]] = {}  # model id -> (partial dir, bytes at start)
        self._lock = threading.Lock()

    # -- per model ---------------------------------------------------------------------------
    def where(self, model_id: str, model: ModelSpec) -> remote.Where:
        ref = self.spec.env.secrets.get("hf_token")
        return remote.Where(
            model_id=model_id, repo=model.model, revision=model.revision or DEFAULT_REVISION,
            routing_file=str(self.spec.routing_file), token_env=ref.env if ref else "HF_TOKEN",
            token_set=self.token is not None, target=self.storage_dir / model_id)

    def local_check(self, where: remote.Where, model: ModelSpec) -> tuple[ModelResult | None, Manifest | None, str]:
        """An up-to-date result when nothing needs the network, else (None, manifest, why)."""
        started = time.perf_counter()
        paths = layout.ModelPaths(self.storage_dir, where.model_id)
        manifest, why = check_installed(paths.target, repo=where.repo, revision=where.revision,
                                        selection=selection_key(model))
        pinned = manifest is not None and where.revision == manifest.commit
        if not why and (not self.refresh or pinned or remote.offline()):
            return self.result(where, "up-to-date", manifest, started), manifest, ""
        return None, manifest, why or "refresh asked"

    def plan(self, where: remote.Where, model: ModelSpec, installed: Manifest | None) -> DownloadPlan:
        started = time.perf_counter()
        repo = remote.fetch_repo(where, self.token)
        paths = layout.ModelPaths(self.storage_dir, where.model_id)
        plan = make_plan(where, model, repo, paths, installed)
        plan.started = started
        return plan

    def execute(self, plan: DownloadPlan) -> ModelResult:
        from filelock import FileLock, Timeout

        started = plan.started
        where = plan.where
        paths = layout.ModelPaths(self.storage_dir, where.model_id)
        paths.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(paths.lock, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise HubError(
                f"model '{where.model_id}': another albert download of it is running (lock "
                f"{paths.lock}). Fix: wait for it to finish; the lock frees itself when that "
                "process exits.") from None
        try:
            return self._execute_locked(plan, paths, started)
        except OSError as exc:  # disk full, permissions: in our words when we know them
            raise remote.translate(exc, where) from None
        finally:
            lock.release()

    def _execute_locked(self, plan: DownloadPlan, paths: layout.ModelPaths, started: float) -> ModelResult:
        where = plan.where
        # a run finished meanwhile (another process, or a same-commit manifest): nothing to do
        manifest, why = check_installed(paths.target, repo=where.repo, revision=where.revision,
                                        selection=selection_key(plan.model), commit=plan.commit)
        if not why:
            if manifest.revision != where.revision:
                write_manifest(paths.target, manifest.with_revision(where.revision))
            return self.result(where, "up-to-date", manifest, started)
        plan.partial.mkdir(parents=True, exist_ok=True)
        for path, src in plan.reuse.items():
            layout.link_or_copy(src, plan.partial / path)
        baseline = layout.tree_bytes(plan.partial)
        detail = (f"{len(plan.fetch)} of {len(plan.files)} files at {plan.commit[:12]}; "
                  f"{len(plan.reuse)} reused, {len(plan.resumed)} resumed, {len(plan.skipped)} skipped")
        self.reporter.start(where.model_id, plan.fetch_bytes, detail)
        with self._lock:
            self.active[where.model_id] = (plan.partial, baseline)
        checked: dict[str, str] = {}
        landed = threading.Event()
        hasher = threading.Thread(target=self.verify_as_they_land, args=(plan, checked, landed),
                                  daemon=True)
        hasher.start()
        try:
            if plan.fetch:
                remote.fetch_files(where, plan.commit, plan.fetch, plan.partial, self.token,
                                   max_workers=self.files_per_model)
        finally:
            landed.set()
            hasher.join()
            with self._lock:
                self.active.pop(where.model_id, None)
        self.verify(plan, checked)
        self._tidy(plan)
        manifest = Manifest(
            model_id=where.model_id, repo=where.repo, revision=where.revision, commit=plan.commit,
            selection=selection_key(plan.model), files=plan.files,
            tool={"albert": __version__, "huggingface_hub": _hf_version()})
        write_manifest(plan.partial, manifest)
        layout.install(plan.partial, paths.target)
        for stale in paths.partials():
            shutil.rmtree(stale, ignore_errors=True)
        status: Status = "updated" if plan.previous is not None else "downloaded"
        return self.result(where, status, manifest, started, fetched=plan.fetch,
                           reused=len(plan.reuse), fetch_bytes=plan.fetch_bytes)

    @staticmethod
    def verify_as_they_land(plan: DownloadPlan, checked: dict[str, str], done: threading.Event) -> None:
        """Hash files while the others still download (huggingface_hub renames a file into place
        only once it is complete, so a file at its final path of the right size is whole)."""
        pending = [p for p in plan.files if p not in plan.reuse]
        while pending:
            finished = done.is_set()
            for path in [p for p in pending if _size_is(plan.partial / p, plan.files[p].size)]:
                checked[path] = check_file(plan.partial / path, plan.files[path])
                pending.remove(path)
            if finished:
                return
            done.wait(0.1)

    def verify(self, plan: DownloadPlan, checked: dict[str, str] | None = None) -> None:
        """Hash what was fetched or resumed (reused files were verified when first installed)."""
        checked = dict(checked or {})
        todo = [p for p in plan.files if p not in plan.reuse and p not in checked]
        with ThreadPoolExecutor(max_workers=2) as pool:
            checked |= dict(pool.map(lambda p: (p, check_file(plan.partial / p, plan.files[p])), todo))
        bad = [(p, why) for p, why in checked.items() if why]
        if not bad:
            return
        for path, _ in bad:  # the next run fetches them again
            (plan.partial / path).unlink(missing_ok=True)
        listing = "; ".join(f"{p}: {why}" for p, why in bad[:3])
        raise ChecksumMismatch(
            f"model '{plan.where.model_id}' ({plan.where.repo_at}, commit {plan.commit[:12]}): "
            f"{len(bad)} file(s) do not match the hub's metadata ({listing}). Nothing was "
            f"installed; the bad files were deleted. Fix: re-run; if it fails again the hub copy "
            "or a proxy on the way is corrupt, so pin another 'revision' or report it to the repo.")

    def _tidy(self, plan: DownloadPlan) -> None:
        """Leave only the selected files: no huggingface_hub metadata, nothing stale."""
        shutil.rmtree(plan.partial / ".cache", ignore_errors=True)
        wanted = {plan.partial / p for p in plan.files}
        for root, dirs, files in os.walk(plan.partial, topdown=False):
            for name in files:
                path = Path(root) / name
                if path not in wanted:
                    path.unlink()
            for name in dirs:
                d = Path(root) / name
                if not any(d.iterdir()):
                    d.rmdir()

    def result(self, where: remote.Where, status: Status, manifest: Manifest | None, started: float,
               *, fetched: list[str] = (), reused: int = 0, fetch_bytes: int = 0) -> ModelResult:
        return ModelResult(
            model_id=where.model_id, repo=where.repo, revision=where.revision, path=where.target,
            status=status, commit=manifest.commit if manifest else "",
            files=len(manifest.files) if manifest else 0, files_fetched=len(fetched),
            files_reused=reused, bytes_total=manifest.total_bytes if manifest else 0,
            bytes_fetched=fetch_bytes, seconds=time.perf_counter() - started)

    # -- progress -----------------------------------------------------------------------------
    def watch(self, stop: threading.Event, every_s: float = 0.5) -> None:
        while not stop.wait(every_s):
            with self._lock:
                active = dict(self.active)
            for model_id, (partial, baseline) in active.items():
                self.reporter.update(model_id, max(layout.tree_bytes(partial) - baseline, 0))


def _hf_version() -> str:
    try:
        from huggingface_hub import __version__ as v
    except ImportError:  # pragma: no cover
        return "?"
    return v


def _failed(where: remote.Where, exc: HubError) -> ModelResult:
    result = ModelResult(model_id=where.model_id, repo=where.repo, revision=where.revision,
                         path=where.target, status="failed", error=str(exc))
    result.exception = exc
    return result


def _summary(r: ModelResult) -> str:
    if r.status == "failed":
        return "failed"
    if r.status == "up-to-date":
        return f"up to date ({r.commit[:12]}, {human_bytes(r.bytes_total)})"
    return (f"{r.status} {r.files_fetched} file(s), {human_bytes(r.bytes_fetched)} in "
            f"{r.seconds:.1f} s ({human_bytes(r.bytes_per_s)}/s), {r.files_reused} reused")


def download_models(spec: DeploymentSpec, storage_dir: Path | str | None = None,
                    model_ids: Iterable[str] | None = None, *, refresh: bool = False,
                    max_parallel: int = 2, files_per_model: int = 4,
                    reporter: Reporter | None = None) -> list[ModelResult]:
    """Make ``DIR/<model id>`` hold each model at its pinned revision; one result per model.

    ``refresh``: also ask the hub whether a branch/tag revision moved (a commit sha never does).
    Raises :class:`NotEnoughSpace` before any download, :class:`DownloadsFailed` (with every
    result) when some model failed; models that succeeded are installed either way.
    """
    storage = Path(storage_dir if storage_dir is not None else spec.env.storage_dir)
    table = spec.models
    ids = list(model_ids) if model_ids else table.ids()
    unknown = [m for m in ids if m not in table.root]
    if unknown:
        raise HubError(f"model(s) {', '.join(unknown)} are not in {spec.routing_file}. Fix: use "
                       f"one of: {', '.join(table.ids())}.")
    ref = spec.env.secrets.get("hf_token")
    secret = ref.resolve() if ref else None
    token = secret.get_secret_value() if secret is not None else None
    reporter = reporter or NullReporter()
    dl = Downloader(spec, storage, token=token, refresh=refresh, max_parallel=max_parallel,
                    files_per_model=files_per_model, reporter=reporter)

    results: dict[str, ModelResult] = {}
    pending: list[tuple[remote.Where, ModelSpec, Manifest | None]] = []
    for model_id in ids:
        model = table[model_id]
        where = dl.where(model_id, model)
        done, manifest, why = dl.local_check(where, model)
        if done is not None:
            results[model_id] = done
        elif remote.offline():
            results[model_id] = _failed(where, OfflineMissing(
                f"model '{model_id}' ({where.repo_at}) is not ready in {where.target} ({why}) and "
                "HF_HUB_OFFLINE=1 forbids the download. Fix: unset HF_HUB_OFFLINE, or copy a "
                "complete model directory (with its .albert-manifest.json) there."))
        else:
            pending.append((where, model, manifest))

    if pending:
        stop = threading.Event()
        watcher = threading.Thread(target=dl.watch, args=(stop,), daemon=True)
        watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
                planned = list(pool.map(lambda a: _try(lambda: dl.plan(*a)), pending))
                plans = []
                for (where, _, _), (plan, exc) in zip(pending, planned, strict=True):
                    if exc is not None:
                        results[where.model_id] = _failed(where, exc)
                        reporter.finish(where.model_id, f"failed: {type(exc).__name__} (details below)", False)
                    else:
                        plans.append(plan)
                check_disk_space(plans, storage)
                outcomes = list(pool.map(lambda p: _try(lambda: dl.execute(p)), plans))
            for plan, (res, exc) in zip(plans, outcomes, strict=True):
                if exc is not None:
                    res = _failed(plan.where, exc)
                    reporter.finish(plan.where.model_id, f"failed: {type(exc).__name__} (details below)", False)
                elif res.status != "up-to-date" or res.files_fetched:
                    reporter.finish(plan.where.model_id, _summary(res), True)
                results[plan.where.model_id] = res
        finally:
            stop.set()
            watcher.join()
            reporter.close()
    else:
        reporter.close()

    ordered = [results[m] for m in ids]
    failed = [r for r in ordered if not r.ok]
    if failed:
        text = failed[0].error if len(failed) == 1 else "\n".join(
            [f"{len(failed)} of {len(ordered)} models failed:"] + [f"  - {r.error}" for r in failed])
        raise DownloadsFailed(text, ordered, [r.exception for r in failed])
    return ordered


def _try(fn):
    try:
        return fn(), None
    except HubError as exc:  # every model gets its result; bugs keep their traceback
        return None, exc
