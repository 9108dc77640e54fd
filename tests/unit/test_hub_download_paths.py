"""download_models and file names from a hostile hub: nothing outside the model folder is ever
written, linked, hashed or deleted (the real huggingface_hub client against a local hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyalbert.hub import MANIFEST_NAME, DownloadsFailed, HubError, download_models, layout
from tests.support.hubserver import HubServer, git_blob_sha1, serve_hub, tiny_llama_files

KEYS = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIattackerkeyattackerkeyattacker attacker\n"
VICTIM = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIownerkeyownerkeyownerkeyownerke owner@host\n"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    yield from serve_hub(tmp_path, monkeypatch)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the storage dir (tmp/victim; models live in tmp/models)."""
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    return path


def spec_for(storage_spec):
    return storage_spec({"tiny": {"model": "org/tiny", "port": 8001}})


def assert_refused(err: pytest.ExceptionInfo, name: str) -> None:
    [cause] = err.value.errors
    assert isinstance(cause, HubError)
    message = str(err.value)
    assert "model 'tiny'" in message and "org/tiny" in message and repr(name) in message
    assert "outside" in message and "Fix:" in message


def test_a_name_that_climbs_out_is_refused_before_an_identical_file_is_reused(hub: HubServer, storage_spec,
                                                                             victim: Path):
    """The attack: the installed model has a file with the attacker's content; a new commit names
    ``../../victim`` with the same digest, and the reuse step hard-linked it over the victim."""
    files = tiny_llama_files(with_skipped=False)
    hub.add_commit("org/tiny", {**files, "keys.txt": KEYS})
    spec = spec_for(storage_spec)
    assert download_models(spec)[0].status == "downloaded"
    hub.add_commit("org/tiny", {**files, "keys.txt": KEYS, "../../victim": KEYS})
    hub.reset_requests()

    with pytest.raises(DownloadsFailed) as err:
        download_models(spec, refresh=True)

    assert_refused(err, "../../victim")
    assert victim.read_bytes() == VICTIM and victim.stat().st_nlink == 1
    assert hub.downloads() == []  # refused from the metadata alone
    assert (storage_spec.storage / "tiny" / "keys.txt").read_bytes() == KEYS  # the old install stays


@pytest.mark.parametrize("name", [
    "../../victim",
    "sub/../../../victim",
    "ABSOLUTE",
    "..\\..\\victim",
], ids=["dotdot", "dotdot-inside", "absolute", "backslashes"])
def test_a_bad_name_with_a_wrong_digest_deletes_nothing(hub: HubServer, storage_spec, victim: Path, name):
    """The attack: a name that resolves to an existing file of the announced size is taken as a
    resumed download, hashed, found wrong and deleted."""
    name = str(victim) if name == "ABSOLUTE" else name
    other = bytes(reversed(VICTIM))  # same size, another digest
    hub.add_commit("org/tiny", {**tiny_llama_files(with_skipped=False), name: other})

    with pytest.raises(DownloadsFailed) as err:
        download_models(spec_for(storage_spec))

    assert_refused(err, name)
    assert victim.read_bytes() == VICTIM
    assert hub.downloads() == []
    assert not (storage_spec.storage / "tiny").exists()


def test_a_name_through_a_symlink_out_of_the_download_dir_is_refused(hub: HubServer, storage_spec,
                                                                    tmp_path: Path, victim: Path):
    other = bytes(reversed(VICTIM))
    commit = hub.add_commit("org/tiny", {**tiny_llama_files(with_skipped=False), "lnk/victim": other})
    partial = layout.ModelPaths(storage_spec.storage, "tiny").partial(commit)
    partial.mkdir(parents=True)
    (partial / "lnk").symlink_to(tmp_path)  # planted: lnk/victim is tmp/victim

    with pytest.raises(DownloadsFailed) as err:
        download_models(spec_for(storage_spec))

    assert_refused(err, "lnk/victim")
    assert victim.read_bytes() == VICTIM
    assert hub.downloads() == []


def test_a_previous_manifest_with_a_bad_name_is_never_a_reuse_source(hub: HubServer, storage_spec,
                                                                     victim: Path):
    """A manifest written before this check may name ``../../victim``: its files are not reused."""
    files = tiny_llama_files(with_skipped=False)
    hub.add_commit("org/tiny", files)
    spec = spec_for(storage_spec)
    download_models(spec)
    manifest_path = storage_spec.storage / "tiny" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../victim"] = {"size": len(VICTIM), "blob_id": git_blob_sha1(VICTIM)}
    manifest_path.write_text(json.dumps(manifest))
    hub.add_commit("org/tiny", {**files, "stolen.txt": VICTIM})  # the victim's content, by digest
    hub.reset_requests()

    [result] = download_models(spec, refresh=True)

    assert result.status == "updated"
    assert hub.downloaded_files() == ["stolen.txt"]  # fetched, not copied from outside
    assert (storage_spec.storage / "tiny" / "stolen.txt").stat().st_ino != victim.stat().st_ino


@pytest.mark.parametrize(("name", "why"), [
    ("config.json", ""),
    ("sub/dir/model.safetensors", ""),
    (".gitattributes", ""),
    ("..", "'..'"),
    ("a/../b", "'..'"),
    ("/etc/passwd", "absolute"),
    ("a\\b", "backslash"),
    ("", "empty"),
    ("a//b", "empty"),
    ("./a", "'.'"),
    ("a/", "empty"),
    ("a\0b", "NUL"),
])
def test_unsafe_name(name, why):
    from pyalbert.hub.layout import unsafe_name

    if why:
        assert why in unsafe_name(name)
    else:
        assert unsafe_name(name) == ""
