"""``[api]`` limits reach the gateway's settings; ``albert api --no-metrics-auth`` opens /metrics."""

from __future__ import annotations

import argparse

from pyalbert.api.settings import settings_from_spec
from pyalbert.cli import api_cmd
from pyalbert.config import load_spec
from tests.conftest import ONE_GPU_HOST


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    api_cmd.register(parser.add_subparsers())
    return parser.parse_args(["api", *argv])


def test_api_limits_come_from_the_environment_file(config_factory):
    config_factory.env(ONE_GPU_HOST + """
[api]
metrics_auth = false
max_n_cap = 4
max_header_bytes = 4096
read_timeout_s = 7.5
""")
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    settings = settings_from_spec(load_spec("test", config_factory.root))
    assert (settings.metrics_auth, settings.max_n_cap, settings.max_header_bytes,
            settings.read_timeout_s) == (False, 4, 4096, 7.5)


def test_api_limits_default_to_safe_values(simple_config):
    settings = settings_from_spec(load_spec("test", simple_config.root))
    assert (settings.metrics_auth, settings.max_n_cap, settings.max_header_bytes,
            settings.read_timeout_s) == (True, 16, 32768, 30)


def test_api_limits_are_validated(config_factory):
    config_factory.env(ONE_GPU_HOST + "\n[api]\nmax_header_bytes = 100\n")
    config_factory.routing({"small": {"model": "org/small", "port": 8001, "gpu_mem_use": 0.4}})
    try:
        load_spec("test", config_factory.root)
    except Exception as exc:  # noqa: BLE001
        assert "max_header_bytes" in str(exc)
    else:
        raise AssertionError("max_header_bytes = 100 was accepted")


def test_no_metrics_auth_flag_opens_metrics(simple_config):
    on = api_cmd.settings_from_args(_parse("--env", "test", "--config-dir", str(simple_config.root)))
    off = api_cmd.settings_from_args(_parse("--env", "test", "--config-dir", str(simple_config.root),
                                            "--no-metrics-auth"))
    assert (on.metrics_auth, off.metrics_auth) == (True, False)
