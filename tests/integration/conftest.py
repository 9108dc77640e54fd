import pytest

from tests.support.hosts import (  # noqa: F401 (fixtures)
    fake_vllm_host,
    host_environment,
    make_host,
    one_host,
)
from tests.support.runtimes import env, runtime_host  # noqa: F401 (fixtures: both runtimes)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
