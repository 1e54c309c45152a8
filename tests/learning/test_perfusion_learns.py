"""Learning test: the Perfusion trainer learns the world's concept, and at learning rate 0 it
does not (``python -m pytest -m learning``; see :mod:`tests.learning.harness` for the bars).

The trainer runs through the studio's own code path (``trainers.perfusion`` on the shared loop,
the concept applied with ``studio.methods.perfusion`` while generating), on the world's demo base
wrapped as a :class:`~studio.models.BaseModel`. ``lr_scale`` multiplies both learning rates
(embedding and value targets); at 0 the embedding stays the class word's and ``o*_V = W_V i*_super``,
so the concept renders as the class — the negative control.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.world import DEMO_BASE_DIR
from trainers.perfusion import PRESETS as PERFUSION_PRESETS

# The hand-tuned ``demo-world`` preset: opt-in (``pytest -m slow``) since the default settings are what CI
# learns with, on two bases (test_defaults_*.py); kept as the library of bench/world_compare.py.
pytestmark = [pytest.mark.learning, pytest.mark.slow]

TOKEN = "<hrt>"
# The trainer's "demo-world" preset: batch 16, 100 steps, lr 0.006 (embedding) / 0.01 (o*_V)
PRESET = dict(PERFUSION_PRESETS["demo-world"])
MASKS = True  # the paper trains on segmented subjects: without masks o*_V learns the backgrounds too


def write_masks(images_dir: Path) -> None:
    """``NAME.mask.png`` beside each photo: white where it differs from its (flat) background colour."""
    import numpy as np
    from PIL import Image

    for path in sorted(images_dir.glob("*.png")):
        if path.name.endswith(".mask.png"):
            continue
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        subject = np.abs(pixels - pixels[0, 0]).sum(-1) > 24
        Image.fromarray((subject * 255).astype(np.uint8)).save(path.with_name(f"{path.stem}.mask.png"))


def train_perfusion(images_dir: Path, seed: int, lr_scale: float = 1.0):
    from studio.methods import get_method
    from studio.methods.attention import cfg_layout
    from studio.models.keys import fingerprint_files
    from studio.models.loading import describe
    from studio.world.score import GUIDANCE_SCALE, pipeline_generator
    from studio.world.task import CONCEPT
    from tests.learning.harness import Trained, base_pipeline, concept_bytes
    from trainers.loop import run_training
    from trainers.perfusion import PerfusionConfig, PerfusionTrainer

    if MASKS:
        write_masks(images_dir)
    pipe = base_pipeline()
    base = describe(pipe, spec="demo", name="demo", identity=f"folder:{fingerprint_files(DEMO_BASE_DIR)}")
    cfg = PerfusionConfig(images=str(images_dir), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                          **dict(PRESET, lr=PRESET["lr"] * lr_scale, lr_v=PRESET["lr_v"] * lr_scale))
    concept = run_training(base, PerfusionTrainer(base, cfg, TOKEN), cfg, method="perfusion", save=False).concept
    plain = pipeline_generator(pipe)

    def generate(prompts, seed):
        handle = get_method("perfusion").apply(base, concept, strength=1.0)
        try:
            with cfg_layout(pipe.unet, guided=GUIDANCE_SCALE > 1):  # edit only the conditional rows
                return plain(prompts, seed)
        finally:
            handle.remove()

    return Trained(subject=TOKEN, generate=generate, size_bytes=concept_bytes(concept))


def test_perfusion_learns(tmp_path):
    from tests.learning.harness import assert_learns

    assert_learns(train_perfusion, tmp_path, seeds=(0, 1), name="perfusion")


def test_perfusion_at_learning_rate_zero_does_not(tmp_path):
    from tests.learning.harness import assert_does_not_learn

    assert_does_not_learn(train_perfusion, tmp_path, name="perfusion")
