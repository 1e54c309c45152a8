"""Learning tests: trainers must learn the world's concept, and doing nothing must not pass.

Run with ``python -m pytest -m learning``. Each trainer gets one test that trains on the
concept's photos with two seeds (see :mod:`tests.learning.harness` for the bars).
"""

from __future__ import annotations

import pytest

from tests.learning.harness import assert_does_not_learn, assert_learns, references
from tests.learning.mini_ti import train_mini_ti

pytestmark = pytest.mark.learning


def test_references_bracket_the_task():
    """The baseline (class word only) is low, real renders are near-perfect."""
    refs = references()
    print(refs)
    assert refs.baseline.fidelity <= 0.15, refs
    assert refs.upper.fidelity >= 0.95, refs
    assert refs.upper.editability >= 0.95, refs
    assert refs.baseline.editability >= 0.8, refs


def test_mini_textual_inversion_learns(tmp_path):
    """The validation trainer (one spliced vector, ~150 Adam steps) reaches the bars."""
    assert_learns(train_mini_ti, tmp_path, seeds=(0, 1), name="mini-TI")


def test_negative_control_learning_rate_zero_fails(tmp_path):
    """Permanent negative control: the same trainer at learning rate 0 misses the fidelity bar."""
    assert_does_not_learn(train_mini_ti, tmp_path, name="mini-TI")
