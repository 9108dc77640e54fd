"""The original deployment guide's words, run through the real entry points.

The guide downloads models with ``python albert-backend/pyalbert/albert.py download_model
--storage-dir STORAGE_PATH --env ENV`` (run from the folder holding the clone); ``download_model``
is an alias of ``download_models`` and the guide's flags work, with a space or ``=``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ConfigFactory
from tests.support.hubserver import HubServer, serve_hub, tiny_llama_files

SCRIPT = REPO / "pyalbert" / "albert.py"
ALBERT = Path(sys.executable).parent / "albert"


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    yield from serve_hub(tmp_path, monkeypatch)


@pytest.mark.parametrize("entry", ["script", "albert"], ids=["python-pyalbert-albert.py", "albert"])
def test_help_lists_the_guide_spelling_and_its_flags(entry, tmp_path):
    prefix = [sys.executable, str(SCRIPT)] if entry == "script" else [str(ALBERT)]
    listing = run([*prefix, "--help"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "download_models (download-models, download_model)" in listing.stdout

    helped = run([*prefix, "download_model", "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--storage-dir STORAGE_DIR" in helped.stdout and "--env ENV" in helped.stdout
    assert "original deployment guide" in " ".join(helped.stdout.split())


def test_a_misspelling_is_still_refused(tmp_path):
    result = run([sys.executable, str(SCRIPT), "download_modelz", "--env", "x"], tmp_path)
    assert result.returncode == 2 and "invalid choice: 'download_modelz'" in result.stderr


def test_the_guide_command_downloads_into_the_storage_dir(hub: HubServer, config_factory: ConfigFactory,
                                                          tmp_path: Path):
    config_factory.env('storage_dir = "/nonexistent/default"\n[[hosts]]\nname = "h1"\naddress = "10.0.0.1"\n',
                       name="staging")
    config_factory.routing({"tiny": {"model": "org/tiny", "port": 8001}})
    hub.add_commit("org/tiny", tiny_llama_files(with_skipped=False))
    storage = tmp_path / "STORAGE_PATH"
    config = {"ALBERT_CONFIG_DIR": str(config_factory.root)}

    # exactly the guide's line, from the folder that holds the clone
    first = run([sys.executable, str(SCRIPT), "download_model", "--storage-dir", str(storage),
                 "--env", "staging"], tmp_path, **config)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "downloaded" in first.stdout and "1 changed" in first.stdout
    assert (storage / "tiny" / ".albert-manifest.json").is_file()
    assert (storage / "tiny" / "config.json").is_file()

    # the `=` form of the guide's other revision, through the installed script: nothing to fetch
    hub.reset_requests()
    again = run([str(ALBERT), "download_model", f"--storage-dir={storage}", "--env=staging"],
                tmp_path, **config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up-to-date" in again.stdout and "nothing changed" in again.stdout
    assert hub.requests == []


def test_an_env_the_config_lacks_is_named_with_the_fix(config_factory: ConfigFactory, tmp_path: Path):
    config_factory.env('[[hosts]]\nname = "h1"\naddress = "10.0.0.1"\n', name="staging")
    config_factory.routing({"tiny": {"model": "org/tiny", "port": 8001}})
    result = run([sys.executable, str(SCRIPT), "download_model", "--storage-dir", str(tmp_path / "m"),
                  "--env", "prod"], tmp_path, ALBERT_CONFIG_DIR=str(config_factory.root))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "prod" in result.stderr and "staging" in result.stderr
