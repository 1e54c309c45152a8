"""The house rules, checked by the same command as every other test (so CI and a developer's
`python -m pytest` run them): ruff, import-linter's contracts (layers that only point down, no import
cycles: the ``[tool.importlinter]`` section of pyproject.toml) and mypy over ``studio/`` and ``trainers/``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(cmd[0], path=str(Path(sys.executable).parent)) or shutil.which(cmd[0])
    if exe is None:
        pytest.fail(f"{cmd[0]} is not installed: pip install -r requirements-dev.txt")
    return subprocess.run([exe, *cmd[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean():
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_layers_only_point_down_and_nothing_imports_in_a_loop():
    out = _run("lint-imports")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and "2 kept, 0 broken" in out.stdout


def test_mypy_is_clean():
    out = _run("mypy")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr
