"""NeTI's default settings learn on the demo world; at learning rate 0 they do not (world-b is in
test_defaults_neti_world_b.py: NeTI's runs are the longest, and two files let two test workers share
them; what, why and how: :mod:`tests.learning.defaults`)."""

from __future__ import annotations

import pytest

from tests.learning.defaults import check_control, check_learns

pytestmark = pytest.mark.learning
METHOD, BASE = "neti", "world"


def test_defaults_learn(workdir):
    check_learns(METHOD, BASE, workdir)


def test_defaults_at_learning_rate_zero_do_not_learn(workdir):
    check_control(METHOD, BASE, workdir)
