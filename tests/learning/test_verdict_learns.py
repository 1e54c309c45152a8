"""The end-of-training verdict reads the world correctly: the textual-inversion run the learning
table scores (fidelity 0.86 on seed 0) says "learned", its learning-rate-0 control "not learned"."""

from __future__ import annotations

import pytest

from tests.learning.test_textual_inversion_learns import SETTINGS, TOKEN, _base

pytestmark = pytest.mark.learning


@pytest.mark.parametrize("lr_scale, expected", [(1.0, "learned"), (0.0, "not learned")])
def test_the_verdict_matches_what_the_oracle_sees(tmp_path, lr_scale, expected):
    from studio.world import CONCEPT
    from trainers import get_trainer
    from trainers.loop import run_training

    images = tmp_path / "photos"
    CONCEPT.write_training_folder(images, seed=0)
    base = _base()
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(images), class_word=CONCEPT.class_word, token=TOKEN, seed=0, log_every=0,
                        **dict(SETTINGS, lr=SETTINGS["lr"] * lr_scale))
    concept = run_training(base, entry.make_trainer(base, cfg, TOKEN), cfg, method=entry.method, save=False).concept
    v = concept.metrics["verdict"]
    assert v["verdict"] == expected, v
