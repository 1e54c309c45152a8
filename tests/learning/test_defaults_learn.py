"""Defaults that learn on a base nobody tuned them for: every trainer's *default* settings — no preset,
no hand-set rate or step count — learn the world's concept on both learnable bases, 2 seeds each, and
the same runs at learning rate 0 do not.

The two bases share nothing of their shape: the demo world (32 px, 4×8×8 latents, the 49,408-token
CLIP vocabulary, a 64-wide 2-layer text encoder, a three-level UNet) and world-b (48 px, 4×12×12
latents, a 665-token vocabulary learnt from the world's captions, a 96-wide 3-layer text encoder, a
two-level UNet). The defaults adapt by measurement (initialisation, rates in the base's units, the
``auto`` step budget; docs/methods.md, "Measured defaults"). Runs go through the real paths: the base
loaded from its folder, the CLI's resolve, the runner, the concept applied by its method.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.learning.defaults import BASES, METHODS, train_default
from tests.learning.harness import assert_does_not_learn, assert_learns

pytestmark = pytest.mark.learning


def _where(base: str) -> dict:
    from studio.world import WORLD_B_RESOLUTION

    return {} if base == "world" else {"base_dir": BASES[base], "size": WORLD_B_RESOLUTION}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per module: DreamBooth's generated class images are cached there per base and shared
    by every seed and the control, as a user's cache is shared by their trainings."""
    return tmp_path_factory.mktemp("defaults")


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("method", METHODS)
def test_defaults_learn(method, base, workdir):
    work = workdir / base / method
    assert_learns(train_default(method, base, work), work, seeds=(0, 1), name=f"{method} defaults on {base}",
                  **_where(base))


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("method", METHODS)
def test_defaults_at_learning_rate_zero_do_not_learn(method, base, workdir):
    work = workdir / base / method
    assert_does_not_learn(train_default(method, base, work), work, name=f"{method} defaults on {base}",
                          **_where(base))
