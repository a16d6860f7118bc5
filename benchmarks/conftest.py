"""Fixtures shared by the CPU benchmarks."""
import pytest


@pytest.fixture(scope="module")
def first_results():
    """The first contender's result per case: every later contender must compute the same."""
    return {}
