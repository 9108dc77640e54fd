"""``DIR/<model id>/.albert-manifest.json``: what was installed, from where, verified how.

The manifest is written last, inside the temporary directory, before the directory is renamed
into place: a model directory with a manifest is complete. ``check_installed`` answers "is this
exactly what the routing table asks for?" from the manifest and file sizes only (no network, no
hashing), so a re-run is a few ``stat`` calls.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_NAME = ".albert-manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str | None = None  # LFS files: the content sha256 announced by the hub
    blob_id: str | None = None  # git blob sha1 (non-LFS files)


@dataclass(frozen=True)
class Manifest:
    model_id: str
    repo: str
    revision: str  # as requested in the routing table ("main" when unset)
    commit: str  # what it resolved to
    selection: str  # selection.selection_key(): file rules in force
    files: dict[str, FileEntry]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tool: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = {p: {k: v for k, v in asdict(e).items() if v is not None}
                         for p, e in sorted(self.files.items())}
        data["bytes"] = self.total_bytes
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        return cls(
            model_id=data["model_id"], repo=data["repo"], revision=data["revision"],
            commit=data["commit"], selection=data["selection"],
            files={p: FileEntry(**e) for p, e in data["files"].items()},
            created=data.get("created", ""), tool=dict(data.get("tool", {})),
        )

    def with_revision(self, revision: str) -> Manifest:
        return Manifest(self.model_id, self.repo, revision, self.commit, self.selection,
                        self.files, self.created, self.tool)


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of an installed model, or None when absent or unreadable."""
    try:
        return Manifest.from_json((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Write atomically (temp file + fsync + rename): a reader never sees half a manifest."""
    tmp = model_dir / f"{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, model_dir / MANIFEST_NAME)


def size_mismatches(model_dir: Path, manifest: Manifest) -> list[str]:
    """Files of the manifest missing on disk or of another size ([] = all present)."""
    bad = []
    for path, entry in manifest.files.items():
        try:
            if os.stat(model_dir / path).st_size != entry.size:
                bad.append(path)
        except OSError:
            bad.append(path)
    return bad


def check_installed(model_dir: Path, *, repo: str, revision: str, selection: str,
                    commit: str | None = None) -> tuple[Manifest | None, str]:
    """(manifest, "") when ``model_dir`` holds exactly this; else (manifest or None, why not)."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        return None, "not installed" if not model_dir.exists() else "no valid manifest"
    if manifest.repo != repo:
        return manifest, f"installed from {manifest.repo}"
    if commit is not None:
        if manifest.commit != commit:
            return manifest, f"installed commit {manifest.commit[:12]}, wanted {commit[:12]}"
    elif manifest.revision != revision:
        return manifest, f"installed revision {manifest.revision}, wanted {revision}"
    if manifest.selection != selection:
        return manifest, "file selection rules changed"
    bad = size_mismatches(model_dir, manifest)
    if bad:
        return manifest, f"{len(bad)} file(s) missing or resized ({', '.join(bad[:3])})"
    return manifest, ""
