"""Defaults that learn on a base nobody tuned them for: textual inversion with its *default* settings
(the generic ``cross-init`` preset: measured initialisation, learning rate in the base's units, 320
steps) learns the demo world's concept — the preset was written for SD 1.5 and never tuned here
(the hand-tuned ``demo-world`` preset is what tests/learning/test_textual_inversion_learns.py runs).
Before the rate moved to the base's units, these settings reached fidelity 0.31 here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.learning.harness import Trained, assert_does_not_learn, assert_learns
from tests.learning.test_textual_inversion_learns import TOKEN, _base, trained_ti

pytestmark = pytest.mark.learning


def train_with_defaults(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    from studio.world import CONCEPT
    from trainers import get_trainer
    from trainers.loop import run_training

    base = _base()  # described without the world's profile: a base the presets know nothing about
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(profile=base.profile, images=str(images_dir), class_word=CONCEPT.class_word, token=TOKEN,
                        seed=seed, log_every=0)
    assert cfg.lr is None and cfg.init == "auto"  # the defaults, untouched
    cfg.lr_scale *= lr_scale
    concept = run_training(base, entry.make_trainer(base, cfg, TOKEN), cfg, method=entry.method, save=False).concept
    return trained_ti(base, concept)


def test_textual_inversion_defaults_learn(tmp_path):
    assert_learns(train_with_defaults, tmp_path, seeds=(0, 1), name="textual inversion (defaults)")


def test_textual_inversion_defaults_at_learning_rate_zero_do_not_learn(tmp_path):
    assert_does_not_learn(train_with_defaults, tmp_path, name="textual inversion (defaults)")
