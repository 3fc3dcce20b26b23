"""Shared fixtures: a tiny synthetic corpus cached in a temporary folder."""

import pytest
from task_testing import TINY

import spectron_tasks  # noqa: F401  (registers the default tasks)
from spectron_tasks import synthetic_counting


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """Cache folder holding the tiny synthetic corpus (synthesised once per test session)."""
    cache_dir = str(tmp_path_factory.mktemp("spectron_cache"))
    synthetic_counting.ensure_cached(TINY, cache_dir=cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def tiny_synthetic_task(synthetic_cache):
    return synthetic_counting.register(
        "test_synthetic_counting_tiny", TINY, cache_dir=synthetic_cache
    )
