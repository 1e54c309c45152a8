"""Learning tests need the learnable world's trained weights (scripts/build_world.py)."""

from pathlib import Path

import pytest

from studio.world import DEMO_BASE_DIR


def pytest_collection_modifyitems(config, items):
    if (Path(DEMO_BASE_DIR) / "model_index.json").is_file():
        return
    skip = pytest.mark.skip(reason="the learnable world is not built yet (python scripts/build_world.py)")
    for item in items:
        if "tests/learning/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
