"""Learning test: textual inversion with CoRe (``--core``, trainers/core.py) still learns the world's
concept, and at learning rate 0 it does not (the harness's bars, :mod:`tests.learning.harness`).

The module is also the library of CoRe's comparisons: :func:`train_plain` / :func:`train_core` (textual
inversion) and :func:`train_neti_plain` / :func:`train_neti_core` (NeTI) are harness ``TrainFn`` s with
the same steps, photos, learning rate and seed, differing only in CoRe — the trainers' ``demo-world``
and ``demo-world-core`` presets. CoRe's context prompts on the world are its caption grammar (the
presets say ``core_prompts="world"``; ``auto`` picks it from the world base's profile too).

At learning rate 0 the trained tensors never move, however long the run (CoRe's losses only reach
them through the optimizer, and the norm window puts back norms that did not change): the control
trains one step, as the defaults' controls do (:mod:`tests.learning.defaults`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.learning.harness import Trained, assert_does_not_learn, assert_learns
from trainers.neti import PRESETS as NETI_PRESETS
from trainers.textual_inversion import PRESETS as TI_PRESETS

# Measured (one process, 1 thread): seed 0 0.715 / seed 1 0.518 fidelity, editability 1.000 both; lr 0: 0.000.
# CI learns on seed 0 (0.2 above the bar); seed 1 clears it by one image of 40 (plain 0.520, with CoRe 0.518;
# bar 0.513) — too close to be a test, so the two-seed run is opt-in (``pytest -m slow``).
pytestmark = pytest.mark.learning

TOKEN = "<hrt>"
TI_PLAIN, TI_CORE = dict(TI_PRESETS["demo-world"]), dict(TI_PRESETS["demo-world-core"])
NETI_PLAIN, NETI_CORE = dict(NETI_PRESETS["demo-world"]), dict(NETI_PRESETS["demo-world-core"])
assert {k: v for k, v in TI_CORE.items() if not k.startswith("core")} == TI_PLAIN
assert {k: v for k, v in NETI_CORE.items() if not k.startswith("core")} == NETI_PLAIN


def _base() -> Any:
    import torch

    from studio.models import describe
    from studio.models.profile import world_profile
    from tests.learning.harness import base_pipeline

    return describe(base_pipeline(), spec="demo", name="demo", identity="world-base", device=torch.device("cpu"),
                    dtype=torch.float32, profile=world_profile())


def _train_ti(settings: dict[str, Any], images_dir: Path, seed: int, lr_scale: float) -> Trained:
    from studio.world import CONCEPT
    from tests.learning.test_textual_inversion_learns import trained_ti
    from trainers import get_trainer
    from trainers.loop import run_training

    base = _base()
    entry = get_trainer("textual-inversion")
    extra = {"steps": 1} if lr_scale == 0 else {}
    cfg = entry.resolve(images=str(images_dir), class_word=CONCEPT.class_word, token=TOKEN, seed=seed, log_every=0,
                        **(settings | {"lr": settings["lr"] * lr_scale} | extra))
    concept = run_training(base, entry.make_trainer(base, cfg, TOKEN), cfg, method=entry.method, save=False).concept
    return trained_ti(base, concept)


def train_plain(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """Textual inversion, the ``demo-world`` preset (CoRe off)."""
    return _train_ti(TI_PLAIN, images_dir, seed, lr_scale)


def train_core(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """Textual inversion, the ``demo-world-core`` preset: the same run with CoRe on."""
    return _train_ti(TI_CORE, images_dir, seed, lr_scale)


def _train_neti(settings: dict[str, Any], images_dir: Path, seed: int, lr_scale: float) -> Trained:
    from tests.learning.test_neti_learns import CLASS_WORD, WORLD_TEMPLATES, trained
    from trainers.loop import run_training
    from trainers.neti import NetiTrainConfig, NetiTrainer

    class WorldTrainer(NetiTrainer):  # the world's grammar, as tests/learning/test_neti_learns.py trains
        def prompts(self, templates: list[str], examples: list[Any]) -> list[str]:
            subject = f"{self.token} {CLASS_WORD}"
            return [WORLD_TEMPLATES[sum(map(ord, t)) % len(WORLD_TEMPLATES)].format(subject) for t in templates]

        def core_text(self) -> str:
            return f"{self.token} {CLASS_WORD}"

    base = _base()
    values = settings | {"lr": settings["lr"] * lr_scale} | ({"steps": 1} if lr_scale == 0 else {})
    cfg = NetiTrainConfig(images=str(images_dir), class_word=CLASS_WORD, token=TOKEN, seed=seed, log_every=0,
                          resolution=base.native_size, **values)
    return trained(run_training(base, WorldTrainer(base, cfg, TOKEN), cfg, method="neti", save=False).concept)


def train_neti_plain(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """NeTI, the ``demo-world`` preset (CoRe off)."""
    return _train_neti(NETI_PLAIN, images_dir, seed, lr_scale)


def train_neti_core(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """NeTI, the ``demo-world-core`` preset: the same run with CoRe on."""
    return _train_neti(NETI_CORE, images_dir, seed, lr_scale)


def test_textual_inversion_with_core_learns(tmp_path):
    assert_learns(train_core, tmp_path, seeds=(0,), name="textual inversion + CoRe")


@pytest.mark.slow
def test_textual_inversion_with_core_learns_on_a_second_seed(tmp_path):
    assert_learns(train_core, tmp_path, seeds=(1,), name="textual inversion + CoRe")


def test_textual_inversion_with_core_at_learning_rate_zero_does_not_learn(tmp_path):
    assert_does_not_learn(train_core, tmp_path, name="textual inversion + CoRe")
