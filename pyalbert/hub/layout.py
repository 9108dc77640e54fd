"""Where a model lives under the storage dir, and the atomic install.

``DIR/<model id>`` is the served directory. Downloads go to ``DIR/.<name>.partial-<commit>``
next to it (same filesystem, kept after a failure so the next run resumes), and the finished
directory replaces the target with one ``rename``: on Linux an atomic exchange
(``renameat2(RENAME_EXCHANGE)``), so the old version stays whole until the new one is whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class ModelPaths:
    storage_dir: Path
    model_id: str

    @property
    def target(self) -> Path:
        return self.storage_dir / self.model_id

    @property
    def parent(self) -> Path:
        return self.target.parent

    @property
    def name(self) -> str:
        return self.target.name

    def partial(self, commit: str) -> Path:
        return self.parent / f".{self.name}.partial-{commit[:16]}"

    def partials(self) -> list[Path]:
        return sorted(self.parent.glob(f".{self.name}.partial-*"))

    @property
    def lock(self) -> Path:
        return self.parent / f".{self.name}.lock"


def unsafe_name(name: str) -> str:
    """Why a repo file name cannot be a relative path under a model folder ('' when it can).

    Hub names are POSIX paths relative to the repo root; anything that could point elsewhere
    once joined to a folder is refused: '..' or '.' components, an absolute path, a backslash
    (a separator on Windows, and never in a real repo), empty components, a NUL byte.
    """
    if not name:
        return "an empty name"
    if "\0" in name:
        return "a NUL byte"
    if name.startswith("/"):
        return "an absolute path"
    if "\\" in name:
        return "a backslash"
    parts = name.split("/")
    if ".." in parts:
        return "a '..' component"
    if "." in parts:
        return "a '.' component"
    if "" in parts:
        return "an empty component"
    return ""


def resolves_inside(folder: Path, name: str) -> bool:
    """``folder / name``, symlinks followed as far as they exist, stays under ``folder``."""
    return (folder / name).resolve().is_relative_to(folder.resolve())


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False when the kernel or libc cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's
    except OSError:
        return False
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def install(ready: Path, target: Path) -> None:
    """Put the complete directory ``ready`` at ``target``, replacing any older version.

    Readers see either the old complete directory or the new one (exchange), or, where the
    kernel cannot exchange, no directory for the instant between two renames: never a mix.
    """
    if not target.exists():
        os.rename(ready, target)
    elif _renameat2_exchange(ready, target):
        shutil.rmtree(ready)  # now holds the old version
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(ready, target)
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def link_or_copy(src: Path, dst: Path) -> None:
    """Reuse an identical file: a hard link (instant, no space), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def tree_bytes(root: Path) -> int:
    """Bytes of every regular file under ``root`` (progress of a download in flight)."""
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def free_space(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage("/").free
