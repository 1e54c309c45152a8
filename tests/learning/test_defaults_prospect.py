"""ProSpect's default settings learn on both learnable bases; at learning rate 0 they do not
(what, why and how: :mod:`tests.learning.defaults`)."""

from __future__ import annotations

import pytest

from tests.learning.defaults import BASES, check_control, check_learns

pytestmark = pytest.mark.learning
METHOD = "prospect"

# CI's time budget: the second seed of each base is opt-in (-m slow); both seeds are measured in the
# README's "Defaults that learn" table (python bench/world_defaults.py prospect --base world world-b --seeds 0 1).
SECOND = pytest.mark.slow


@pytest.mark.parametrize(("base", "seed"), [("world", 0), pytest.param("world", 1, marks=SECOND),
                                            ("world-b", 0), pytest.param("world-b", 1, marks=SECOND)])
def test_defaults_learn(base, seed, workdir):
    check_learns(METHOD, base, workdir, seeds=(seed,))


@pytest.mark.parametrize("base", sorted(BASES))
def test_defaults_at_learning_rate_zero_do_not_learn(base, workdir):
    check_control(METHOD, base, workdir)
