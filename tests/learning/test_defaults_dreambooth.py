"""DreamBooth-LoRA's default settings learn on both learnable bases; at learning rate 0 they do not
(what, why and how: :mod:`tests.learning.defaults`)."""

from __future__ import annotations

import pytest

from tests.learning.defaults import BASES, check_control, check_learns

pytestmark = pytest.mark.learning
METHOD = "dreambooth"


# The one cell the defaults miss, measured (README, "Defaults that learn"): on the demo world, seed 1
# renders the concept (fidelity 0.876) but one image of 40 too many keeps the photos' background
# (editability 0.875 < bar 0.878). Rank 4 misses it by fidelity (0.18); rank 16 over-fits the backgrounds
# of three of four runs (editability 0.575, 0.875, 0.725). Strict: the day it passes, this mark must go.
MISS = pytest.mark.xfail(strict=True, raises=AssertionError,
                         reason="DreamBooth-LoRA defaults on the demo world, seed 1: editability 0.875 < 0.878")


@pytest.mark.parametrize(("base", "seed"), [("world", 0), pytest.param("world", 1, marks=MISS),
                                            ("world-b", 0), ("world-b", 1)])
def test_defaults_learn(base, seed, workdir):
    check_learns(METHOD, base, workdir, seeds=(seed,))


@pytest.mark.parametrize("base", sorted(BASES))
def test_defaults_at_learning_rate_zero_do_not_learn(base, workdir):
    check_control(METHOD, base, workdir)
