"""Pure parts of the model download: file selection, manifest, verification, install swap."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from pyalbert.config.routing import ModelSpec
from pyalbert.hub import layout
from pyalbert.hub.manifest import (
    FileEntry,
    Manifest,
    check_installed,
    read_manifest,
    write_manifest,
)
from pyalbert.hub.selection import select_files, selection_key
from pyalbert.hub.verify import check_file

LLAMA_REPO = [
    ".gitattributes", "README.md", "config.json", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
    "pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx", "model-q4.gguf",
]


def spec(**kw) -> ModelSpec:
    return ModelSpec(model="org/m", port=8001, **kw)


def test_selection_keeps_what_vllm_reads_and_skips_the_rest():
    kept, skipped = select_files(spec(), LLAMA_REPO)
    assert kept == [
        "README.md", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    ]
    assert set(skipped) == set(LLAMA_REPO) - set(kept)


@pytest.mark.parametrize(
    ("files", "model", "expect_kept"),
    [
        pytest.param(["config.json", "pytorch_model.bin"], spec(), ["config.json", "pytorch_model.bin"],
                     id="bin-kept-without-safetensors"),
        pytest.param(["config.json", "model.gguf", "model.safetensors"], spec(quantization="gguf"),
                     ["config.json", "model.gguf", "model.safetensors"], id="gguf-kept-for-gguf"),
        pytest.param(["config.json", "model.safetensors", "consolidated.safetensors", "params.json"],
                     spec(), ["config.json", "model.safetensors", "params.json"],
                     id="mistral-native-skipped"),
        pytest.param(["model.safetensors", "consolidated.safetensors"],
                     spec(extra_args=("--load-format", "mistral")),
                     ["model.safetensors", "consolidated.safetensors"], id="mistral-native-kept"),
        pytest.param(["consolidated.safetensors", "params.json"], spec(),
                     ["consolidated.safetensors", "params.json"], id="only-native-kept"),
    ],
)
def test_selection_cases(files, model, expect_kept):
    assert select_files(model, files)[0] == expect_kept


def test_selection_key_changes_with_weight_format():
    assert selection_key(spec()) != selection_key(spec(quantization="gguf"))
    assert selection_key(spec()) == selection_key(spec(quantization="awq"))


def _manifest(files: dict[str, FileEntry], revision: str = "main") -> Manifest:
    return Manifest(model_id="m", repo="org/m", revision=revision, commit="a" * 40,
                    selection=selection_key(spec()), files=files, tool={"albert": "0.1.0"})


def test_manifest_round_trip_and_installed_check(tmp_path: Path):
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"x" * 10)
    manifest = _manifest({"config.json": FileEntry(2, blob_id="b" * 40),
                          "sub/w.safetensors": FileEntry(10, sha256="c" * 64)})
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    key = {"repo": "org/m", "selection": selection_key(spec())}
    assert check_installed(tmp_path, revision="main", **key)[1] == ""
    assert check_installed(tmp_path, revision="v2", **key)[1] == "installed revision main, wanted v2"
    assert "installed from org/m" in check_installed(tmp_path, revision="main", repo="org/x",
                                                      selection=key["selection"])[1]
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"x" * 9)
    assert check_installed(tmp_path, revision="main", **key)[1] == \
        "1 file(s) missing or resized (sub/w.safetensors)"
    assert check_installed(tmp_path / "nope", revision="main", **key) == (None, "not installed")
    (tmp_path / ".albert-manifest.json").write_text("{not json")
    assert check_installed(tmp_path, revision="main", **key) == (None, "no valid manifest")


def test_check_file_uses_sha256_for_lfs_and_git_blob_id_otherwise(tmp_path: Path):
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    blob = hashlib.sha1(b"blob 5\x00hello").hexdigest()
    assert check_file(path, FileEntry(5, sha256=sha)) == ""
    assert check_file(path, FileEntry(5, blob_id=blob)) == ""
    assert check_file(path, FileEntry(5)) == ""
    assert check_file(path, FileEntry(6, sha256=sha)) == "size 5 bytes, expected 6"
    assert check_file(path, FileEntry(5, sha256="0" * 64)).startswith(f"sha256 {sha}, expected 000")
    assert check_file(path, FileEntry(5, blob_id="0" * 40)).startswith(f"git blob id {blob}")
    assert check_file(tmp_path / "missing", FileEntry(5)) == "missing"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_install_replaces_old_version_whole(tmp_path: Path, monkeypatch, exchange: bool):
    if not exchange:
        monkeypatch.setattr(layout, "_renameat2_exchange", lambda a, b: False)
    paths = layout.ModelPaths(tmp_path, "org/m")
    paths.parent.mkdir(parents=True)
    old = paths.partial("1" * 40)
    old.mkdir()
    (old / "w").write_text("v1")
    layout.install(old, paths.target)
    assert (paths.target / "w").read_text() == "v1" and not old.exists()
    new = paths.partial("2" * 40)
    new.mkdir()
    (new / "w").write_text("v2")
    layout.install(new, paths.target)
    assert (paths.target / "w").read_text() == "v2"
    assert sorted(os.listdir(paths.parent)) == ["m"]  # old version removed, no leftovers


def test_model_paths_keep_temp_dirs_next_to_the_target(tmp_path: Path):
    paths = layout.ModelPaths(tmp_path, "org/name")
    assert paths.target == tmp_path / "org" / "name"
    assert paths.partial("abcdef" * 7) == tmp_path / "org" / ".name.partial-abcdefabcdefabcd"
    assert paths.lock == tmp_path / "org" / ".name.lock"


def _where(tmp_path: Path):
    from pyalbert.hub.remote import Where

    return Where("m", "org/m", "main", "config/llm_routing_table.json", "HF_TOKEN", False,
                 tmp_path / "models" / "m")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(OSError(errno.ENOSPC, "No space left on device"),
                     ["the disk filled up while writing under", "partial download is kept", "--storage-dir"],
                     id="disk-full"),
        pytest.param(PermissionError(errno.EACCES, "Permission denied", "/data/models/m"),
                     ["cannot write /data/models/m (Permission denied)", "writable"], id="read-only"),
        pytest.param(OSError("Consistency check failed: file should be of size 10 but has size 5 (x)"),
                     ["arrived with the wrong size", "re-run"], id="short-body"),
    ],
)
def test_os_errors_become_one_paragraph(tmp_path: Path, exc, expected):
    from pyalbert.hub import HubError
    from pyalbert.hub.remote import translate

    error = translate(exc, _where(tmp_path))
    assert isinstance(error, HubError)
    assert str(error).startswith("model 'm' (org/m@main, config/llm_routing_table.json): ")
    assert "\n" not in str(error)
    for text in expected:
        assert text in str(error)


def test_line_reporter_prints_start_progress_every_interval_and_end():
    from io import StringIO

    from rich.console import Console

    from pyalbert.hub.progress import LineReporter

    out, now = StringIO(), [0.0]
    reporter = LineReporter(Console(file=out, width=200), every_s=10, clock=lambda: now[0])
    reporter.start("m", 2_000_000_000, "3 of 5 files")
    now[0] = 5
    reporter.update("m", 500_000_000)  # too soon: silent
    now[0] = 10
    reporter.update("m", 1_000_000_000)
    reporter.finish("m", "downloaded", True)
    assert out.getvalue().splitlines() == [
        "m: downloading 2.0 GB (3 of 5 files)",
        "m:  50% 1.0 GB / 2.0 GB, 100.0 MB/s",
        "m: downloaded",
    ]
