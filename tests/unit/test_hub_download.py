"""download_models against a local hub, with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyalbert.config import load_spec
from pyalbert.hub import (
    MANIFEST_NAME,
    AccessDenied,
    ChecksumMismatch,
    DownloadsFailed,
    NotEnoughSpace,
    NotFoundOnHub,
    OfflineMissing,
    download_models,
    layout,
    read_manifest,
)
from tests.conftest import REPO
from tests.support.hubserver import (
    TINY_LLAMA_KEPT,
    HubServer,
    serve_hub,
    tiny_llama_files,
)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    yield from serve_hub(tmp_path, monkeypatch)




def tiny(repo: str = "org/tiny", port: int = 8001, **kw) -> dict:
    return {"model": repo, "port": port, **kw}


def installed_files(model_dir: Path) -> set[str]:
    return {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}


def test_first_download_installs_a_plain_verified_directory(hub: HubServer, storage_spec):
    files = tiny_llama_files()
    commit = hub.add_commit("org/tiny", files)
    spec = storage_spec({"tiny": tiny()})

    [result] = download_models(spec)

    target = storage_spec.storage / "tiny"
    assert (result.status, result.commit, result.path) == ("downloaded", commit, target)
    assert installed_files(target) == TINY_LLAMA_KEPT | {MANIFEST_NAME}
    assert not any(p.is_symlink() for p in target.rglob("*"))
    for name in TINY_LLAMA_KEPT:
        assert (target / name).read_bytes() == files[name]
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert (manifest["repo"], manifest["revision"], manifest["commit"]) == ("org/tiny", "main", commit)
    weights = files["model.safetensors"]
    assert manifest["files"]["model.safetensors"] == {
        "size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert manifest["files"]["config.json"]["size"] == len(files["config.json"])
    assert set(manifest["tool"]) == {"albert", "huggingface_hub"} and manifest["created"]
    assert hub.downloaded_files() == sorted(TINY_LLAMA_KEPT)  # skipped files never requested
    assert sorted(p.name for p in storage_spec.storage.iterdir()) == [".tiny.lock", "tiny"]


def test_rerun_with_same_revision_makes_no_request(hub: HubServer, storage_spec):
    from io import StringIO

    from rich.console import Console

    from pyalbert.hub.progress import RichReporter

    hub.add_commit("org/tiny", tiny_llama_files())
    spec = storage_spec({"tiny": tiny()})
    screen = StringIO()
    download_models(spec, reporter=RichReporter(Console(file=screen, force_terminal=True, width=120)))
    assert "tiny" in screen.getvalue() and "done" in screen.getvalue()
    hub.reset_requests()

    [result] = download_models(spec)

    assert result.status == "up-to-date" and result.files_fetched == 0
    assert hub.requests == []


def test_damaged_install_refetches_only_the_damaged_file(hub: HubServer, storage_spec):
    hub.add_commit("org/tiny", tiny_llama_files())
    spec = storage_spec({"tiny": tiny()})
    download_models(spec)
    (storage_spec.storage / "tiny" / "tokenizer.json").write_text("truncated")
    hub.reset_requests()

    [result] = download_models(spec)

    assert result.status == "updated" and result.files_reused == len(TINY_LLAMA_KEPT) - 1
    assert hub.downloaded_files() == ["tokenizer.json"]
    assert (storage_spec.storage / "tiny" / "tokenizer.json").stat().st_size > 1000


def test_changed_revision_fetches_only_changed_files(hub: HubServer, storage_spec):
    files = tiny_llama_files()
    v1 = hub.add_commit("org/tiny", files)
    download_models(storage_spec({"tiny": tiny(revision=v1)}))
    weights_inode = (storage_spec.storage / "tiny" / "model.safetensors").stat().st_ino
    v2 = hub.add_commit("org/tiny", {**files, "config.json": files["config.json"] + b"\n",
                                     "added.json": b"{}"})
    hub.reset_requests()

    [result] = download_models(storage_spec({"tiny": tiny(revision=v2)}))

    assert (result.status, result.commit) == ("updated", v2)
    assert hub.downloaded_files() == ["added.json", "config.json"]
    target = storage_spec.storage / "tiny"
    assert read_manifest(target).commit == v2 and (target / "added.json").exists()
    assert (target / "model.safetensors").stat().st_ino == weights_inode  # reused, not copied
    assert [p.name for p in storage_spec.storage.iterdir() if "partial" in p.name or "old" in p.name] == []


def test_transfer_cut_midway_resumes_with_a_range_request(hub: HubServer, storage_spec, monkeypatch):
    # huggingface_hub writes DOWNLOAD_CHUNK_SIZE (10 MiB) chunks and resumes after the last one
    # written; 1 MiB here so that a 2.6 MB file shows it
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024 * 1024)
    files = tiny_llama_files(with_skipped=False)
    hub.add_commit("org/tiny", files)
    hub.cut_once["model.safetensors"] = 0.5
    spec = storage_spec({"tiny": tiny()})

    [result] = download_models(spec)

    assert result.status == "downloaded"
    size = len(files["model.safetensors"])
    gets = [r for r in hub.downloads() if r.path.endswith("model.safetensors")]
    assert [r.range for r in gets][0] is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert resumed_at == 1024 * 1024
    assert gets[1].status == 206 and gets[1].body_bytes == size - resumed_at
    assert (storage_spec.storage / "tiny" / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_interrupted_run_installs_nothing_and_next_run_fetches_only_the_rest(hub: HubServer, storage_spec):
    hub.add_commit("org/tiny", tiny_llama_files())
    hub.fail_get["model.safetensors"] = 500
    spec = storage_spec({"tiny": tiny()})

    with pytest.raises(DownloadsFailed, match="HTTP 500") as err:
        download_models(spec)

    assert err.value.results[0].status == "failed"
    assert not (storage_spec.storage / "tiny").exists()
    [partial] = layout.ModelPaths(storage_spec.storage, "tiny").partials()
    done_before = {p for p in installed_files(partial) if not p.startswith(".cache/")}
    assert done_before and "model.safetensors" not in done_before
    hub.fail_get.clear()
    hub.reset_requests()

    [result] = download_models(spec)

    assert result.status == "downloaded"
    assert hub.downloaded_files() == sorted(TINY_LLAMA_KEPT - done_before)
    assert layout.ModelPaths(storage_spec.storage, "tiny").partials() == []


def test_wrong_checksum_is_refused_and_nothing_installed(hub: HubServer, storage_spec):
    hub.add_commit("org/tiny", tiny_llama_files())
    hub.corrupt.add("model.safetensors")
    spec = storage_spec({"tiny": tiny()})

    with pytest.raises(DownloadsFailed) as err:
        download_models(spec)

    assert isinstance(_cause(err.value), ChecksumMismatch)
    message = str(err.value)
    assert "model 'tiny'" in message and "model.safetensors: sha256" in message and "Fix:" in message
    assert not (storage_spec.storage / "tiny").exists()
    [partial] = layout.ModelPaths(storage_spec.storage, "tiny").partials()
    assert not (partial / "model.safetensors").exists()  # the bad copy is gone
    hub.corrupt.clear()
    hub.reset_requests()
    assert download_models(spec)[0].status == "downloaded"
    assert hub.downloaded_files() == ["model.safetensors"]


def test_wrong_small_file_is_caught_by_its_git_blob_id(hub: HubServer, storage_spec):
    hub.add_commit("org/tiny", tiny_llama_files(with_skipped=False))
    hub.corrupt.add("config.json")  # non-LFS file: checked by its git blob id
    with pytest.raises(DownloadsFailed) as err:
        download_models(storage_spec({"tiny": tiny()}))
    assert "config.json: git blob id" in str(err.value)
    assert isinstance(_cause(err.value), ChecksumMismatch)


def _cause(exc: DownloadsFailed):
    return exc.errors[0]


def test_gated_repo_without_token_says_what_to_do(hub: HubServer, storage_spec):
    hub.add_commit("org/gated", tiny_llama_files(with_skipped=False))
    hub.gate("org/gated", {"hf_good"})
    spec = storage_spec({"g": tiny("org/gated")})

    with pytest.raises(DownloadsFailed) as err:
        download_models(spec)

    message = str(err.value)
    assert isinstance(_cause(err.value), AccessDenied)
    assert "HTTP 401" in message and "HF_TOKEN is not set" in message and "accept the licence" in message
    assert not (storage_spec.storage / "g").exists()


def test_gated_repo_with_token_downloads_and_token_stays_secret(hub: HubServer, storage_spec, monkeypatch,
                                                                caplog, capsys):
    hub.add_commit("org/gated", tiny_llama_files(with_skipped=False))
    hub.gate("org/gated", {"hf_sEcReT_good"})
    spec = storage_spec({"g": tiny("org/gated")})
    caplog.set_level("DEBUG")

    monkeypatch.setenv("HF_TOKEN", "hf_sEcReT_bad")
    with pytest.raises(DownloadsFailed) as err:
        download_models(spec)
    assert "HTTP 403" in str(err.value) and "HF_TOKEN is set but its account has no access" in str(err.value)

    monkeypatch.setenv("HF_TOKEN", "hf_sEcReT_good")
    assert download_models(spec)[0].status == "downloaded"

    assert {r.token for r in hub.downloads()} == {"hf_sEcReT_good"}
    seen = str(err.value) + caplog.text + "".join(capsys.readouterr())
    assert "hf_sEcReT" not in seen


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param(tiny("org/absent"), ["repo org/absent was not found", "correct 'model' of 'm'"],
                     id="missing-repo"),
        pytest.param(tiny(revision="v9"), ["revision 'v9' does not exist", "set 'revision' of 'm'"],
                     id="missing-revision"),
    ],
)
def test_missing_repo_or_revision(hub: HubServer, storage_spec, entry, expected):
    hub.add_commit("org/tiny", tiny_llama_files(with_skipped=False))
    spec = storage_spec({"m": entry})
    with pytest.raises(DownloadsFailed) as err:
        download_models(spec)
    assert isinstance(_cause(err.value), NotFoundOnHub)
    for text in expected:
        assert text in str(err.value)
    assert str(spec.routing_file) in str(err.value)
    assert not (storage_spec.storage / "m").exists()


def test_not_enough_disk_space_fails_before_any_download(hub: HubServer, storage_spec, monkeypatch):
    hub.add_commit("org/tiny", tiny_llama_files())
    monkeypatch.setattr(layout, "free_space", lambda path: 10_000_000)
    spec = storage_spec({"tiny": tiny()})

    with pytest.raises(NotEnoughSpace) as err:
        download_models(spec)

    message = str(err.value)
    assert f"not enough disk space in {storage_spec.storage}" in message
    assert "needs 2.6 MB" in message and "10.0 MB is free" in message and "--storage-dir" in message
    assert hub.downloads() == [] and not (storage_spec.storage / "tiny").exists()


def test_offline_mode_uses_what_is_on_disk_and_names_what_is_not(hub: HubServer, storage_spec, monkeypatch):
    hub.add_commit("org/tiny", tiny_llama_files(with_skipped=False))
    hub.add_commit("org/other", tiny_llama_files(with_skipped=False, seed=1))
    download_models(storage_spec({"tiny": tiny()}))
    spec = storage_spec({"tiny": tiny(), "other": tiny("org/other", 8002)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_requests()

    with pytest.raises(DownloadsFailed) as err:
        download_models(spec)

    assert [r.status for r in err.value.results] == ["up-to-date", "failed"]
    assert isinstance(_cause(err.value), OfflineMissing)
    assert "model 'other'" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert hub.requests == []


def test_models_download_concurrently(hub: HubServer, storage_spec):
    hub.add_commit("org/a", tiny_llama_files(with_skipped=False, seed=1))
    hub.add_commit("org/b", tiny_llama_files(with_skipped=False, seed=2))
    hub.throttle_bps = 8_000_000  # ~0.3 s per weights file
    spec = storage_spec({"a": tiny("org/a"), "b": tiny("org/b", 8002)})

    results = download_models(spec, max_parallel=2)

    assert [r.status for r in results] == ["downloaded", "downloaded"]
    a, b = (next(r for r in hub.downloads() if r.path.startswith(f"/org/{m}/")
                 and r.path.endswith(".safetensors")) for m in "ab")
    assert max(a.started, b.started) < min(a.ended, b.ended), "weights were fetched one after the other"


def test_unknown_model_id_is_refused(hub: HubServer, storage_spec):
    spec = storage_spec({"tiny": tiny()})
    with pytest.raises(Exception, match=r"model\(s\) nope are not in .*use one of: tiny"):
        download_models(spec, model_ids=["nope"])


KILL_SCRIPT = """
import sys
from pyalbert.config import load_spec
from pyalbert.hub import download_models
from pathlib import Path
download_models(load_spec("test", Path(sys.argv[1])))
"""


def test_killed_download_leaves_no_half_model(hub: HubServer, storage_spec, config_factory):
    old_files = tiny_llama_files(with_skipped=False)
    v1 = hub.add_commit("org/old", old_files)
    download_models(storage_spec({"old": tiny("org/old", revision=v1)}))
    v2 = hub.add_commit("org/old", tiny_llama_files(with_skipped=False, layers=8))
    hub.add_commit("org/fresh", tiny_llama_files(with_skipped=False))
    storage_spec({"old": tiny("org/old", revision=v2), "fresh": tiny("org/fresh", 8002)})
    hub.throttle_bps = 1_000_000  # weights take seconds: the kill lands mid-transfer
    paths = {m: layout.ModelPaths(storage_spec.storage, m) for m in ("old", "fresh")}

    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config_factory.root)], cwd=REPO,
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        def fresh_has_a_complete_file() -> bool:
            return any(f.is_file() for d in paths["fresh"].partials() for f in d.iterdir())

        while sum(p.endswith(".safetensors") for p in hub.in_flight()) < 2 or \
                not fresh_has_a_complete_file():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the downloads never got going"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)

    assert not paths["fresh"].target.exists()
    old = read_manifest(paths["old"].target)
    assert old is not None and old.commit == v1
    assert (paths["old"].target / "model.safetensors").read_bytes() == old_files["model.safetensors"]
    [partial] = paths["fresh"].partials()  # kept for resume
    done_before = {p.name for p in partial.iterdir() if p.is_file()}
    assert done_before and not any(name.endswith(".safetensors") for name in done_before)
    hub.throttle_bps = None
    hub.reset_requests()
    results = download_models(load_spec("test", config_factory.root))
    assert [(r.model_id, r.status) for r in results] == [("old", "updated"), ("fresh", "downloaded")]
    assert read_manifest(paths["old"].target).commit == v2
    fresh_fetched = {r.path.rsplit("/", 1)[1] for r in hub.downloads() if "/org/fresh/" in r.path}
    assert fresh_fetched and not fresh_fetched & done_before


def test_branch_revision_is_rechecked_only_with_refresh(hub: HubServer, storage_spec):
    files = tiny_llama_files(with_skipped=False)
    hub.add_commit("org/tiny", files)
    spec = storage_spec({"tiny": tiny(revision="main")})
    download_models(spec)
    moved = hub.add_commit("org/tiny", {**files, "README.md": b"# moved\n"})
    hub.reset_requests()

    assert download_models(spec)[0].status == "up-to-date"  # pinned to what 'main' was
    assert hub.requests == []

    [result] = download_models(spec, refresh=True)
    assert (result.status, result.commit) == ("updated", moved)
    assert hub.downloaded_files() == ["README.md"]
