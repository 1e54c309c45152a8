"""Fixtures of the learning tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per test module: generated class images are cached there per base and shared by every
    seed and the control, as a user's cache is shared by their trainings."""
    return tmp_path_factory.mktemp("defaults")
