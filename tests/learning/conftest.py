"""Fixtures of the learning tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per test module: generated class images are cached there per base and shared by every
    seed and the control, as a user's cache is shared by their trainings."""
    return tmp_path_factory.mktemp("defaults")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A learning test trains and scores for minutes (NeTI's two seeds: 410 s on an idle 2-core machine),
    longer on a busy one: its hang guard is 30 minutes, not the suite's 10 (pyproject.toml)."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(1800))
