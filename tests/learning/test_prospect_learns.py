"""ProSpect learns the world's concept (see :mod:`tests.learning.harness` for the bars).

The studio's own trainer (:class:`trainers.prospect.ProSpectTrainer`, shared loop, its templates)
trains one vector per denoising stage on the concept's photos with the ``demo-world`` preset; the
concept is applied with :class:`studio.methods.prospect.ProSpect` (file → hook → prompt) for
generation. ``lr_scale = 0`` keeps every stage at the class word: the negative control.

:func:`train_ti_same` is plain textual inversion with the same steps, photos, batch, learning rate
and class-word start (one vector instead of one per stage) — the comparison of
``python -m tests.learning.test_prospect_learns``, which prints both on a few seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.learning.harness import Trained, assert_does_not_learn, assert_learns
from trainers.prospect import PRESETS

pytestmark = [pytest.mark.learning]

TOKEN = "<hrt>"
SETTINGS = dict(PRESETS["demo-world"])


def _base() -> Any:
    import torch

    from studio.models import describe
    from tests.learning.harness import base_pipeline

    return describe(base_pipeline(), spec="demo", name="demo", identity="world-base", device=torch.device("cpu"),
                    dtype=torch.float32)


def _train(trainer: str, images_dir: Path, seed: int, lr_scale: float, **settings: Any) -> Trained:
    from studio.world import CONCEPT
    from tests.learning.defaults import trained
    from trainers import get_trainer
    from trainers.loop import run_training

    base = _base()
    entry = get_trainer(trainer)
    cfg = entry.resolve("", images=str(images_dir), class_word=CONCEPT.class_word, token=TOKEN, seed=seed,
                        log_every=0, budget="fixed", probe=False, **settings)
    concept = run_training(base, entry.make_trainer(base, cfg, TOKEN), cfg, method=entry.method, save=False).concept
    return trained(base, concept)


def train_prospect(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """The harness's ``TrainFn`` for ProSpect (``demo-world`` preset, lr × ``lr_scale``)."""
    return _train("prospect", images_dir, seed, lr_scale, **dict(SETTINGS, lr=SETTINGS["lr"] * lr_scale))


def train_ti_same(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """Plain textual inversion with ProSpect's steps, batch, learning rate and class-word start: one vector."""
    return _train("textual-inversion", images_dir, seed, lr_scale, init="plain", num_vectors=1,
                  steps=SETTINGS["steps"], batch_size=SETTINGS["batch_size"], lr=SETTINGS["lr"] * lr_scale,
                  reg_weight=0.0)


# The demo-world preset's tests are opt-in (-m slow): the defaults tests (test_defaults_prospect.py) supersede
# them in CI, as for every other trainer.
@pytest.mark.slow
def test_prospect_learns(tmp_path):
    assert_learns(train_prospect, tmp_path, seeds=(0, 1), name="ProSpect")


@pytest.mark.slow
def test_prospect_at_learning_rate_zero_does_not_learn(tmp_path):
    assert_does_not_learn(train_prospect, tmp_path, name="ProSpect")


if __name__ == "__main__":
    import sys
    import tempfile
    import time

    from studio.world.score import evaluate
    from studio.world.task import CONCEPT
    from tests.learning.harness import PER_PROMPT, oracle, references

    seeds = [int(s) for s in sys.argv[1:]] or [0, 1, 2]
    print(references())
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            folder = Path(tmp) / f"concept-seed{seed}"
            CONCEPT.write_training_folder(folder, seed=seed)
            for name, fn in (("prospect", train_prospect), ("ti-same", train_ti_same)):
                t0 = time.perf_counter()
                t = fn(folder, seed, 1.0)
                scores = evaluate(t.generate, t.subject, CONCEPT, per_prompt=PER_PROMPT, seed=seed, oracle=oracle())
                print(f"{name} seed {seed}: {scores} ({time.perf_counter() - t0:.1f}s)", flush=True)
