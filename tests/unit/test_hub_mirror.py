"""The hub mirror (``albert hub serve``) with the real huggingface_hub client and download_models."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pyalbert.cli import main
from pyalbert.hub import (
    MANIFEST_NAME,
    AccessDenied,
    DownloadsFailed,
    NotFoundOnHub,
    download_models,
)
from pyalbert.hub.mirror.folders import CACHE_NAME, MirrorError
from pyalbert.hub.mirror.protocol import (
    FileMeta,
    RangeNotSatisfiable,
    byte_range,
    git_blob_sha1,
    lfs_pointer,
)
from pyalbert.hub.mirror.service import Mirror
from tests.conftest import REPO
from tests.support.hubserver import TINY_LLAMA_KEPT, tiny_llama_files


def write_tree(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A clean client side: temp HF_HOME, no token, online, no xet."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def files() -> dict[str, bytes]:
    """A multi-file model: two weight shards, tokenizer, configs, files in sub-folders."""
    return tiny_llama_files(shards=2)


@pytest.fixture
def root(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "mirror"
    write_tree(root / "org" / "tiny", files)
    return root


@pytest.fixture
def serve(hf_env: pytest.MonkeyPatch):
    """serve(mirror) -> url, with HF_ENDPOINT set; every server stopped at teardown."""
    stops = []

    def start(mirror: Mirror) -> str:
        url, stop = mirror.serve_in_thread("127.0.0.1", 0)
        stops.append(stop)
        hf_env.setenv("HF_ENDPOINT", url)
        return url

    yield start
    for stop in stops:
        stop()




# -- download_models and snapshot_download against the mirror ---------------------------------

def test_download_models_installs_the_mirrored_model_byte_identical(root, files, serve, storage_spec):
    mirror = Mirror(root)
    serve(mirror)
    spec = storage_spec({"tiny": {"model": "org/tiny", "port": 8001}})

    [result] = download_models(spec)

    target = storage_spec.storage / "tiny"
    assert (result.status, result.commit) == ("downloaded", mirror.snapshot("org/tiny").commit)
    kept = (TINY_LLAMA_KEPT - {"model.safetensors"}) | {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    assert {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()} == kept | {MANIFEST_NAME}
    for name in kept:
        assert (target / name).read_bytes() == files[name], name
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert (manifest["repo"], manifest["commit"]) == ("org/tiny", result.commit)
    shard = files["model-00001-of-00002.safetensors"]
    assert manifest["files"]["model-00001-of-00002.safetensors"] == {
        "size": len(shard), "sha256": hashlib.sha256(shard).hexdigest()}
    assert manifest["files"]["config.json"] == {
        "size": len(files["config.json"]), "blob_id": git_blob_sha1(files["config.json"])}

    [again] = download_models(spec)  # pinned by the manifest: no change, nothing fetched
    assert again.status == "up-to-date"


def test_snapshot_download_gets_every_file_including_subfolders(root, files, serve, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    mirror = Mirror(root)
    url = serve(mirror)
    out = tmp_path / "out"

    snapshot_download("org/tiny", local_dir=out, endpoint=url)

    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
           if p.is_file() and ".cache" not in p.parts}
    assert got == files
    info = HfApi(endpoint=url).model_info("org/tiny", files_metadata=True)
    by_name = {s.rfilename: s for s in info.siblings}
    assert by_name["onnx/model.onnx"].lfs.sha256 == hashlib.sha256(files["onnx/model.onnx"]).hexdigest()
    assert by_name["README.md"].lfs is None and by_name["README.md"].size == len(files["README.md"])
    tree = {e.path for e in HfApi(endpoint=url).list_repo_tree("org/tiny", recursive=True)}
    assert {"onnx", "onnx/model.onnx", "original/consolidated.00.pth"} <= tree


def test_resumed_transfer_asks_a_range_and_gets_the_rest(root, files, serve, tmp_path):
    from huggingface_hub.file_download import http_get

    mirror = Mirror(root)
    lines: list[str] = []
    mirror.log = lines.append
    url = serve(mirror)
    name = "model-00001-of-00002.safetensors"
    data = files[name]
    half = len(data) // 2
    part = tmp_path / "part"
    part.write_bytes(data[:half])  # what a cut transfer left

    with open(part, "ab") as fh:
        http_get(f"{url}/org/tiny/resolve/main/{name}", fh, resume_size=half, expected_size=len(data))

    assert part.read_bytes() == data
    assert [line for line in lines if name in line] == [
        f'"GET /org/tiny/resolve/main/{name} HTTP/1.1" 206 range=bytes={half}-']


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("bytes=0-", (0, 99)),
    ("bytes=10-19", (10, 19)),
    ("bytes=90-500", (90, 99)),
    ("bytes=-10", (90, 99)),
    ("bytes=0-1,5-6", None),  # several ranges: the whole file
], ids=["none", "open", "closed", "past-end", "suffix", "multi"])
def test_byte_range(header, expected):
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=20-10", "bytes=-0"])
def test_byte_range_not_satisfiable(header):
    with pytest.raises(RangeNotSatisfiable):
        byte_range(header, 100)


def test_range_answers_on_the_wire(root, files, serve):
    url = serve(Mirror(root))
    data = files["config.json"]
    with httpx.Client(base_url=url) as client:
        partial = client.get("/org/tiny/resolve/main/config.json", headers={"Range": "bytes=5-"})
        past = client.get("/org/tiny/resolve/main/config.json", headers={"Range": f"bytes={len(data)}-"})
        head = client.head("/org/tiny/resolve/main/model-00002-of-00002.safetensors")

    assert (partial.status_code, partial.content) == (206, data[5:])
    assert partial.headers["Content-Range"] == f"bytes 5-{len(data) - 1}/{len(data)}"
    assert partial.headers["ETag"] == f'"{git_blob_sha1(data)}"'
    assert (past.status_code, past.headers["Content-Range"]) == (416, f"bytes */{len(data)}")
    shard = files["model-00002-of-00002.safetensors"]
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(shard).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(shard))


# -- errors -------------------------------------------------------------------------------------

def test_unknown_repo_revision_and_file_answer_the_hubs_errors(root, serve, storage_spec):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as hf

    mirror = Mirror(root)
    url = serve(mirror)
    commit = mirror.snapshot("org/tiny").commit
    api = HfApi(endpoint=url)

    assert api.model_info("org/tiny", revision=commit).sha == commit  # the sha resolves too
    with pytest.raises(hf.RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(hf.RevisionNotFoundError):
        api.model_info("org/tiny", revision="v2")
    with pytest.raises(hf.RemoteEntryNotFoundError):
        hf_hub_download("org/tiny", "nope.json", endpoint=url)
    with httpx.Client(base_url=url) as client:
        answer = client.get("/org/tiny/resolve/main/..%2F..%2F..%2Fetc%2Fpasswd")  # never outside the repo
    assert (answer.status_code, answer.headers["X-Error-Code"]) == (404, "EntryNotFound")

    with pytest.raises(DownloadsFailed) as err:
        download_models(storage_spec({"tiny": {"model": "org/tiny", "port": 8001, "revision": "v2"}}))
    assert isinstance(err.value.results[0].exception, NotFoundOnHub)
    assert "revision 'v2' does not exist" in str(err.value)


def test_token_is_required_when_configured(root, files, serve, storage_spec, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as hf

    url = serve(Mirror(root, token="s3cret-token"))

    with pytest.raises(hf.GatedRepoError) as missing:
        HfApi(endpoint=url).model_info("org/tiny")
    assert missing.value.response.status_code == 401
    with pytest.raises(hf.GatedRepoError) as wrong:
        HfApi(endpoint=url, token="hf_wrong").model_info("org/tiny")
    assert wrong.value.response.status_code == 403
    got = hf_hub_download("org/tiny", "config.json", endpoint=url, token="s3cret-token",
                          local_dir=tmp_path / "out")
    assert Path(got).read_bytes() == files["config.json"]

    with pytest.raises(DownloadsFailed) as err:  # download_models without hf_token
        download_models(storage_spec({"tiny": {"model": "org/tiny", "port": 8001}}))
    assert isinstance(err.value.results[0].exception, AccessDenied)


# -- folders, commits and the digest cache ------------------------------------------------------

def test_explicit_repo_mapping_adds_to_the_discovered_ones(root, files, serve):
    from huggingface_hub import HfApi

    write_tree(root / "flat-copy", {"config.json": files["config.json"]})
    mirror = Mirror(root, {"acme/flat": "flat-copy"})
    url = serve(mirror)

    assert sorted(mirror.repo_dirs) == ["acme/flat", "org/tiny"]
    info = HfApi(endpoint=url).model_info("acme/flat", files_metadata=True)
    assert [(s.rfilename, s.size) for s in info.siblings] == [("config.json", len(files["config.json"]))]


def test_restart_reuses_the_digest_cache_and_a_change_makes_a_new_commit(root, files, serve):
    from huggingface_hub import HfApi

    first = Mirror(root)
    [snap] = first.index()
    assert first.hashed_files == len(files) and (root / CACHE_NAME).is_file()

    second = Mirror(root)  # a restart: nothing rehashed, same commit
    [again] = second.index()
    assert (second.hashed_files, again.commit, again.files) == (0, snap.commit, snap.files)

    url = serve(second)
    os.utime(root / "org" / "tiny" / "config.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = HfApi(endpoint=url).model_info("org/tiny")
    assert changed.sha != snap.commit and second.hashed_files == 1  # only the touched file
    assert Mirror(root).index()[0].commit == changed.sha


def test_lfs_blob_id_is_the_pointers_and_etag_the_sha256():
    data = b"\0" * 2_000_000  # big enough to be LFS whatever the name
    meta = FileMeta.of_bytes("weights.dat", data)
    sha = hashlib.sha256(data).hexdigest()
    assert (meta.lfs, meta.sha256, meta.etag) == (True, sha, sha)
    assert meta.blob_id == git_blob_sha1(lfs_pointer(sha, len(data)))
    assert FileMeta.of_bytes("a.json", b"{}") == FileMeta(2, git_blob_sha1(b"{}"))


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["--repo", "no-slash=x"], "expected ORG/NAME=SUBDIR"),
    (["--repo", "org/x=missing"], "is not a directory"),
    (["--token-env", "ALBERT_TEST_UNSET_TOKEN"], "ALBERT_TEST_UNSET_TOKEN"),
], ids=["bad-mapping", "missing-subdir", "unset-token-var"])
def test_cli_mistakes_are_one_paragraph(root, argv, message, capsys, monkeypatch):
    monkeypatch.delenv("ALBERT_TEST_UNSET_TOKEN", raising=False)
    assert main(["hub", "serve", "--root", str(root), *argv]) == MirrorError.exit_code
    err = capsys.readouterr().err
    assert message in err and "Fix:" in err and "Traceback" not in err


def test_cli_empty_root_says_how_to_lay_models_out(tmp_path, capsys):
    assert main(["hub", "serve", "--root", str(tmp_path)]) == MirrorError.exit_code
    assert "<org>/<name>" in capsys.readouterr().err


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_cli_serves_a_200mb_file_without_holding_it_in_memory(tmp_path, hf_env):
    size = 200 * 1024 * 1024
    folder = tmp_path / "root" / "org" / "big"
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.truncate(size)  # sparse: no disk used
    (folder / "config.json").write_text("{}")
    hf_env.setenv("ALBERT_MIRROR_TOKEN", "t0ken")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pyalbert.cli import run; run()", "hub", "serve",
         "--root", str(tmp_path / "root"), "--port", "0", "--token-env", "ALBERT_MIRROR_TOKEN", "--quiet"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = ""
        for line in proc.stdout:  # bounded: the process prints a few lines, then serves
            if "HF_ENDPOINT=" in line:
                url = line.rsplit("HF_ENDPOINT=", 1)[1].strip()
                break
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else ""
        peak_before = _status_kb(proc.pid, "VmHWM")
        digest, received = hashlib.sha256(), 0
        with httpx.stream("GET", f"{url}/org/big/resolve/main/model.safetensors",
                          headers={"Authorization": "Bearer t0ken"}, timeout=60) as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_bytes(1024 * 1024):
                digest.update(chunk)
                received += len(chunk)
        peak_after = _status_kb(proc.pid, "VmHWM")
        assert received == size and answer.headers["X-Linked-Size"] == str(size)
        assert answer.headers["X-Linked-Etag"] == f'"{digest.hexdigest()}"'
        assert peak_after - peak_before < 16 * 1024, (peak_before, peak_after)  # KiB; the file is 200 MiB
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0
