import os
import shutil
import tempfile

import pytest

from tests.helpers import MINI_ZIP, make_archive

# One JAX compilation cache for the whole session, shared by this process and every
# command the tests start (they inherit the environment): the suite trains the same small
# shapes in many processes, and each compiled them again. Set before anything imports jax;
# a fresh folder per session, so no test sees a program compiled by another version.
# (pytest-xdist's workers inherit the folder of the process that made it, which removes it)
_OWN_CACHE = "CIFAKE_TEST_JAX_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["CIFAKE_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="cifake-test-jax-cache-")
os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ["CIFAKE_TEST_JAX_CACHE"],
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["CIFAKE_TEST_JAX_CACHE"], ignore_errors=True)


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
