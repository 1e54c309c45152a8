"""Perfusion's default settings learn on both learnable bases; at learning rate 0 they do not
(what, why and how: :mod:`tests.learning.defaults`)."""

from __future__ import annotations

import pytest

from tests.learning.defaults import BASES, check_control, check_learns

pytestmark = pytest.mark.learning
METHOD = "perfusion"


@pytest.mark.parametrize(("base", "seed"), [("world", 0), ("world", 1), ("world-b", 0), ("world-b", 1)])
def test_defaults_learn(base, seed, workdir):
    check_learns(METHOD, base, workdir, seeds=(seed,))


@pytest.mark.parametrize("base", sorted(BASES))
def test_defaults_at_learning_rate_zero_do_not_learn(base, workdir):
    check_control(METHOD, base, workdir)
