import os

import pytest

from tests.helpers import MINI_ZIP, make_archive


@pytest.fixture
def tiny_zip(tmp_path):
    """6 train + 3 test images per class, in the Kaggle layout."""
    return make_archive(tmp_path / "tiny.zip")


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture
def mini_zip():
    """../shared/data/cifake/cifake-mini.zip. Skipped where absent, except in CI
    (CIFAKE_REQUIRE_SHARED=1, set by .ci/run), where its absence is a failure."""
    if not MINI_ZIP.is_file():
        if os.environ.get("CIFAKE_REQUIRE_SHARED") == "1":
            pytest.fail(f"{MINI_ZIP} is required in CI but missing")
        pytest.skip(f"{MINI_ZIP} not present (a fresh clone without ../shared)")
    return MINI_ZIP


def pytest_collection_modifyitems(config, items):
    """Files holding a ``slow`` test run first (each file's tests keep their order, so its
    module fixtures are built once): the workers then finish on the many short tests
    instead of one waiting for the other's long one."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
