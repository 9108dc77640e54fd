import pytest

from tests.support.hosts import host_environment, make_host, one_host  # noqa: F401 (fixtures)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
