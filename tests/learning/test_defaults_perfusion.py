"""Perfusion's default settings learn on both learnable bases; at learning rate 0 they do not
(what, why and how: :mod:`tests.learning.defaults`)."""

from __future__ import annotations

import pytest

from tests.learning.defaults import BASES, check_control, check_learns

pytestmark = pytest.mark.learning
METHOD = "perfusion"


# The one cell the defaults miss, measured (README, "Defaults that learn"): on world-b, seed 1, the auto
# budget keeps its best-gain step (160 of 280) at fidelity 0.474 < bar 0.500, where a fixed 400 steps
# reach 0.635 — the gain is a proxy the stop rule trusts too early here. Strict: when it passes, drop it.
MISS = pytest.mark.xfail(strict=True, raises=AssertionError,
                         reason="Perfusion defaults on world-b, seed 1: fidelity 0.474 < 0.500 (auto budget stops early)")


@pytest.mark.parametrize(("base", "seed"), [("world", 0), ("world", 1), ("world-b", 0),
                                            pytest.param("world-b", 1, marks=MISS)])
def test_defaults_learn(base, seed, workdir):
    check_learns(METHOD, base, workdir, seeds=(seed,))


@pytest.mark.parametrize("base", sorted(BASES))
def test_defaults_at_learning_rate_zero_do_not_learn(base, workdir):
    check_control(METHOD, base, workdir)
