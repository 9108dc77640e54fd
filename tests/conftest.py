"""Shared fixtures. Heavy ones (namespace hosts, dockerd, vLLM) live in tests/support."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pyalbert.config import load_spec

REPO = Path(__file__).resolve().parents[1]


class ConfigFactory:
    """Writes a throwaway config folder: ``environments/<env>.toml`` + a routing table."""

    def __init__(self, root: Path):
        self.root = root
        (root / "environments").mkdir(parents=True, exist_ok=True)

    def routing(self, table: dict | str, name: str = "llm_routing_table.json") -> Path:
        path = self.root / name
        path.write_text(table if isinstance(table, str) else json.dumps(table, indent=2))
        return path

    def env(self, text: str, name: str = "test") -> Path:
        path = self.root / "environments" / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return path


@pytest.fixture
def config_factory(tmp_path: Path) -> ConfigFactory:
    return ConfigFactory(tmp_path / "config")


ONE_GPU_HOST = """
    [[hosts]]
    name = "gpu-1"
    address = "10.0.0.1"
    gpus = 1
"""


@pytest.fixture
def simple_config(config_factory: ConfigFactory) -> ConfigFactory:
    config_factory.env(ONE_GPU_HOST)
    config_factory.routing(
        {
            "small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4},
            "other": {"model": "org/other", "port": 8002, "gpu_mem_use": 0.4},
        }
    )
    return config_factory


@pytest.fixture
def storage_spec(config_factory: ConfigFactory, tmp_path: Path):
    """``storage_spec(routing) -> spec`` of a one-host environment; ``.storage`` = tmp/models."""
    storage = tmp_path / "models"

    def make(routing: dict):
        config_factory.env(f'storage_dir = "{storage}"\n[[hosts]]\nname = "h1"\naddress = "10.0.0.1"\n')
        config_factory.routing(routing)
        return load_spec("test", config_factory.root)

    make.storage = storage
    return make
