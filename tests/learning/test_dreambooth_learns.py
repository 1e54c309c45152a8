"""Learning test: DreamBooth-LoRA (with prior preservation) learns the world's concept.

Run with ``python -m pytest -m learning tests/learning/test_dreambooth_learns.py`` once the world
is built (``python scripts/build_world.py``). The trainer is the studio's own: the runner trains a
LoRA concept file on the demo base, and generation applies it through the LoRA method (so the
kohya file → diffusers adapter path is what gets scored). ``lr_scale = 0`` leaves every LoRA ``B``
at zero — the concept is then exactly the base, the negative control.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from studio.world.task import CONCEPT
from tests.learning.defaults import lora_trained
from tests.learning.harness import Trained, assert_does_not_learn, assert_learns
from trainers.lora import PRESETS as DREAMBOOTH_PRESETS

# The hand-tuned ``demo-world`` preset: opt-in (``pytest -m slow``) since the default settings are what CI
# learns with, on two bases (test_defaults_*.py); kept as the library of bench/world_compare.py.
pytestmark = [pytest.mark.learning, pytest.mark.slow]

# The trainer's "demo-world" preset: the toy world's UNet is small and its images are 32 px, so a
# higher learning rate than SD's 1e-4 and a text-encoder LoRA so that the identifier (an untrained
# BPE token there) gets a meaning quickly.
SETTINGS = dict(DREAMBOOTH_PRESETS["demo-world"], token="sks")


@functools.lru_cache(maxsize=1)
def _demo_base():
    from studio.models import load_base

    return load_base("demo", device="cpu")


def train_dreambooth(workdir: Path):
    """A harness trainer ``(images_dir, seed, lr_scale) -> Trained`` that writes into ``workdir``."""
    from trainers import get_trainer
    from trainers.runner import train

    entry = get_trainer("dreambooth")

    def run(images_dir: Path, seed: int, lr_scale: float) -> Trained:
        base = _demo_base()
        values = dict(SETTINGS, lr=SETTINGS["lr"] * lr_scale)
        cfg = entry.resolve(images=str(images_dir), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                          out=str(workdir / f"dreambooth-{seed}-{lr_scale:g}.safetensors"),
                          class_cache_dir=str(workdir / "class-images"), **values)
        return lora_trained(base, train(entry, cfg, base).concept)

    return run


def test_dreambooth_lora_learns(tmp_path):
    assert_learns(train_dreambooth(tmp_path), tmp_path, seeds=(0, 1), name="DreamBooth-LoRA")


def test_dreambooth_lora_at_learning_rate_zero_does_not_learn(tmp_path):
    assert_does_not_learn(train_dreambooth(tmp_path), tmp_path, name="DreamBooth-LoRA")
