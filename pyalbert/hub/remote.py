"""The hub side, through huggingface_hub: repo metadata, file fetches, and errors in our words.

huggingface_hub is imported lazily: a no-op run (everything installed) never pays its import.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from pyalbert import __version__
from pyalbert.hub.errors import AccessDenied, ChecksumMismatch, HubError, NotFoundOnHub
from pyalbert.hub.manifest import FileEntry

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


def endpoint() -> str:
    """The hub URL, read at call time (``HF_ENDPOINT``, e.g. a mirror or a test server)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE=1``: use what is on disk, never touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Where:
    """What to name in an error message."""

    model_id: str
    repo: str
    revision: str
    routing_file: str
    token_env: str
    token_set: bool
    target: Path

    @property
    def repo_at(self) -> str:
        return f"{self.repo}@{self.revision}"


@dataclass(frozen=True)
class RemoteRepo:
    repo: str
    commit: str
    files: dict[str, FileEntry]


def fetch_repo(where: Where, token: str | None, *, timeout: float = 30) -> RemoteRepo:
    """One ``GET /api/models/{repo}/revision/{rev}?blobs=true``: commit sha, sizes, sha256s."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=token, library_name="albert", library_version=__version__)
    try:
        info = api.model_info(where.repo, revision=where.revision, files_metadata=True, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - translated or re-raised below
        raise translate(exc, where) from None
    if not info.sha:
        raise HubError(f"model '{where.model_id}': the hub at {endpoint()} answered without a "
                       f"commit sha for {where.repo_at}. Fix: check HF_ENDPOINT points at a hub.")
    files = {}
    for sib in info.siblings or []:
        if sib.lfs is not None:
            files[sib.rfilename] = FileEntry(size=sib.lfs.size, sha256=sib.lfs.sha256)
        elif sib.size is not None:
            files[sib.rfilename] = FileEntry(size=sib.size, blob_id=sib.blob_id)
        else:
            raise HubError(f"model '{where.model_id}': the hub at {endpoint()} gave no size for "
                           f"{sib.rfilename} in {where.repo_at}. Fix: check HF_ENDPOINT.")
    return RemoteRepo(repo=where.repo, commit=info.sha, files=files)


def fetch_files(where: Where, commit: str, paths: list[str], local_dir: Path, token: str | None,
                *, max_workers: int = 4) -> None:
    """``snapshot_download`` of exactly ``paths`` at ``commit`` into ``local_dir`` (plain files)."""
    from huggingface_hub import snapshot_download
    from tqdm.auto import tqdm

    class Silent(tqdm):  # huggingface_hub's own bars are off: we report progress ourselves
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    try:
        snapshot_download(
            where.repo,
            revision=commit,
            local_dir=local_dir,
            cache_dir=local_dir / ".cache" / "hub",  # never the user's cache: all of it goes away
            allow_patterns=[glob.escape(p) for p in paths],
            token=token,
            endpoint=endpoint(),
            max_workers=max_workers,
            tqdm_class=Silent,
            library_name="albert",
            library_version=__version__,
        )
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, where) from None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def translate(exc: BaseException, where: Where) -> BaseException:
    """A huggingface_hub / network / OS error as one paragraph for the user (others unchanged)."""
    from huggingface_hub import errors as hf

    head = f"model '{where.model_id}' ({where.repo_at}, {where.routing_file})"
    token = (f"{where.token_env} is set but its account has no access" if where.token_set
             else f"{where.token_env} is not set")
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, hf.GatedRepoError) or (
        isinstance(exc, hf.HfHubHTTPError) and _status(exc) in (401, 403)
        and not isinstance(exc, hf.RepositoryNotFoundError)
    ):
        return AccessDenied(
            f"{head}: the hub refused access (HTTP {_status(exc)}): the repo is gated or private and "
            f"{token}. Fix: accept the licence on {endpoint()}/{where.repo} with the account of the "
            f"token, and set {where.token_env} (a CI/CD variable, secret 'hf_token') to a read token.")
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFoundOnHub(
            f"{head}: revision '{where.revision}' does not exist in {where.repo} on {endpoint()}. "
            f"Fix: set 'revision' of '{where.model_id}' in {where.routing_file} to an existing "
            "commit sha, tag or branch.")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFoundOnHub(
            f"{head}: repo {where.repo} was not found on {endpoint()} (HTTP {_status(exc)}; a private "
            f"repo looks the same without a token, and {token}). Fix: correct 'model' of "
            f"'{where.model_id}' in {where.routing_file}, or set {where.token_env}.")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return NotFoundOnHub(
            f"{head}: a file listed by the hub is missing at download time ({exc.response.url}). "
            "Fix: pin 'revision' to a commit sha; retry later if the repo is being updated.")
    if isinstance(exc, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled) or _is_connect_error(exc):
        return HubError(
            f"{head}: cannot reach the hub at {endpoint()} ({type(exc).__name__}). Fix: check the "
            "network and HF_ENDPOINT; set HF_HUB_OFFLINE=1 only if the models are already on disk.")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HubError(
            f"{head}: the disk filled up while writing under {where.target.parent} ({exc.strerror}). "
            "Nothing was installed; the partial download is kept for resume. Fix: free space there "
            "or pass --storage-dir on a larger disk, then re-run.")
    if isinstance(exc, PermissionError):
        return HubError(
            f"{head}: cannot write {exc.filename or where.target.parent} ({exc.strerror}). Fix: make "
            "the storage dir writable by this user, or pass --storage-dir.")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return ChecksumMismatch(
            f"{head}: a file arrived with the wrong size ({str(exc).splitlines()[0]}). Nothing was "
            "installed. Fix: re-run (the transfer was probably cut); if it persists, a proxy alters it.")
    if isinstance(exc, hf.HfHubHTTPError):
        return HubError(f"{head}: the hub at {endpoint()} answered HTTP {_status(exc)}. Fix: retry "
                        "later; check HF_ENDPOINT.")
    return exc


def _is_connect_error(exc: BaseException) -> bool:
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older huggingface_hub
        return False
    return isinstance(exc, httpx2.TransportError)
