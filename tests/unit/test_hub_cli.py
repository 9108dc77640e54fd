"""``albert download_models`` / ``download-models`` end to end against a local hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyalbert.cli import main
from tests.conftest import ConfigFactory
from tests.support.hubserver import HubServer, serve_hub, tiny_llama_files


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    yield from serve_hub(tmp_path, monkeypatch)


@pytest.fixture
def config(config_factory: ConfigFactory, tmp_path: Path) -> ConfigFactory:
    config_factory.env(f"""
        storage_dir = "{tmp_path / 'default-storage'}"
        [[hosts]]
        name = "h1"
        address = "10.0.0.1"
    """)
    config_factory.routing({
        "tiny": {"model": "org/tiny", "port": 8001},
        "other": {"model": "org/other", "port": 8002},
    })
    return config_factory


def test_download_then_rerun_reports_nothing_changed(hub: HubServer, config, tmp_path, capsys):
    hub.add_commit("org/tiny", tiny_llama_files(with_skipped=False))
    storage = tmp_path / "elsewhere"
    argv = ["--env", "test", "--config-dir", str(config.root), "--storage-dir", str(storage),
            "--model", "tiny"]

    assert main(["download-models", *argv]) == 0
    out = capsys.readouterr().out
    assert "downloaded" in out and "1 changed" in out and "org/tiny@main" in out
    assert (storage / "tiny" / ".albert-manifest.json").is_file()
    assert not (tmp_path / "default-storage").exists()

    hub.reset_requests()
    assert main(["download_models", *argv]) == 0
    out = capsys.readouterr().out
    assert "up-to-date" in out and "nothing changed" in out
    assert hub.requests == []


def test_failure_prints_the_table_and_one_paragraph(hub: HubServer, config, tmp_path, capsys):
    hub.add_commit("org/tiny", tiny_llama_files(with_skipped=False))  # org/other does not exist
    storage = tmp_path / "models"

    code = main(["download-models", "--env", "test", "--config-dir", str(config.root),
                 "--storage-dir", str(storage)])

    captured = capsys.readouterr()
    assert code == 4
    assert "downloaded" in captured.out and "failed" in captured.out
    assert "repo org/other was not found" in captured.err and "Traceback" not in captured.err
    assert (storage / "tiny").is_dir() and not (storage / "other").exists()
