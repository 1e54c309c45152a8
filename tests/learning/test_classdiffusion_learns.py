"""Learning test: ClassDiffusion (DreamBooth-LoRA + prior preservation + the semantic preservation loss,
trainers/classdiffusion.py) learns the world's concept.

Run with ``python -m pytest -m learning tests/learning/test_classdiffusion_learns.py`` once the world is
built. The trainer is the studio's own ``dreambooth`` with its ``classdiffusion`` preset (the demo world's
DreamBooth recipe, λ = 0.01); ``lr_scale = 0`` leaves every LoRA ``B`` at zero — the concept is then exactly
the base, the negative control (the loss then has gradients, but a zero learning rate moves nothing).

:func:`train_dreambooth_prior` and :func:`train_classdiffusion` are harness trainers
``(images_dir, seed, lr_scale) -> Trained`` that differ only in the loss, for side-by-side comparisons
(they write beside ``images_dir``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from studio.world.task import CONCEPT
from tests.learning.defaults import lora_trained
from tests.learning.harness import Trained, assert_does_not_learn, assert_learns
from trainers.lora import PRESETS as DREAMBOOTH_PRESETS

pytestmark = pytest.mark.learning

SETTINGS = dict(DREAMBOOTH_PRESETS["classdiffusion"], token="sks")


@functools.lru_cache(maxsize=1)
def _demo_base():
    from studio.models import load_base

    return load_base("demo", device="cpu")


def _train(images_dir: Path, seed: int, lr_scale: float, weight: float) -> Trained:
    """DreamBooth-LoRA with prior preservation on the demo base, ``classdiffusion_weight = weight``."""
    from trainers import get_trainer
    from trainers.runner import train

    entry = get_trainer("dreambooth")
    workdir = Path(images_dir).parent
    base = _demo_base()
    # at learning rate 0 nothing moves however long the run: the control trains one step (as the defaults' do)
    values = dict(SETTINGS, lr=SETTINGS["lr"] * lr_scale, classdiffusion_weight=weight) | (
        {"steps": 1} if lr_scale == 0 else {})
    cfg = entry.resolve(images=str(images_dir), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                        out=str(workdir / f"classdiffusion-{weight:g}-{seed}-{lr_scale:g}.safetensors"),
                        class_cache_dir=str(workdir / "class-images"), **values)
    return lora_trained(base, train(entry, cfg, base).concept)


def train_dreambooth_prior(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """The comparison's baseline: the ``classdiffusion`` preset with the loss off (λ = 0)."""
    return _train(images_dir, seed, lr_scale, 0.0)


def train_classdiffusion(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """The ``classdiffusion`` preset: the same run with the semantic preservation loss at its λ."""
    return _train(images_dir, seed, lr_scale, float(SETTINGS["classdiffusion_weight"]))


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # seed 1 opt-in: CI's time budget
def test_classdiffusion_learns(tmp_path, seed):
    assert_learns(train_classdiffusion, tmp_path, seeds=(seed,), name="ClassDiffusion")


def test_classdiffusion_at_learning_rate_zero_does_not_learn(tmp_path):
    assert_does_not_learn(train_classdiffusion, tmp_path, name="ClassDiffusion")
