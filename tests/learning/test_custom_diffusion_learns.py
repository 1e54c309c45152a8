"""Learning test: Custom Diffusion (modifier token + cross-attention K/V, prior preservation) learns the
world's concept, and at learning rate 0 it does not.

The trainer is the studio's own: the runner trains a concept file on the demo base with the trainer's
``demo-world`` preset, and generation applies it through the method (tokens in the token table, K/V
deltas through the shared attention processor) — the path users take.

Two ``TrainFn`` factories are exposed for comparison benches: :func:`train_custom_diffusion` and
:func:`train_dreambooth_lora_same`, DreamBooth-LoRA with prior preservation on the same steps, batch,
class images and prompt ("photo of a <identifier> circle"), so the two differ in what trains only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from studio.world.score import pipeline_generator
from studio.world.task import CONCEPT
from tests.learning.harness import Trained, assert_does_not_learn, assert_learns, concept_bytes
from trainers.custom_diffusion import PRESETS

pytestmark = pytest.mark.learning

SETTINGS: dict[str, Any] = dict(PRESETS["demo-world"])
"""The trainer's measured ``demo-world`` preset (README, Custom Diffusion)."""


@functools.lru_cache(maxsize=1)
def _demo_base():
    from studio.models import load_base

    return load_base("demo", device="cpu")


def _applied_generator(base: Any, concept: Any):
    from studio.methods import get_method

    generate_plain = pipeline_generator(base.pipe)

    def generate(prompts, gen_seed):
        handle = get_method(concept.method).apply(base, concept, strength=1.0)
        try:
            return generate_plain(prompts, gen_seed)  # the subject "<tok> class" is the method's prompt text
        finally:
            handle.remove()

    return generate


def train_custom_diffusion(workdir: Path, **overrides: Any):
    """A harness ``TrainFn`` ``(images_dir, seed, lr_scale) -> Trained``: Custom Diffusion with the
    ``demo-world`` preset (``overrides`` replace its values); ``lr_scale`` multiplies both rates."""
    from trainers import get_trainer
    from trainers.runner import train

    entry = get_trainer("custom-diffusion")
    values = dict(SETTINGS, **overrides)

    def run(images_dir: Path, seed: int, lr_scale: float) -> Trained:
        base = _demo_base()
        rates = {k: values[k] * lr_scale for k in ("lr", "token_lr") if values.get(k) is not None}
        if lr_scale == 0:  # nothing moves at learning rate 0 however long the run: the control trains one step
            rates["steps"] = 1
        cfg = entry.resolve(images=str(images_dir), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                            token="<new1>", out=str(workdir / f"custom-diffusion-{seed}-{lr_scale:g}.safetensors"),
                            class_cache_dir=str(workdir / "class-images"), **(values | rates))
        concept = train(entry, cfg, base).concept
        return Trained(subject=f"{concept.trigger} {concept.class_word}", generate=_applied_generator(base, concept),
                       size_bytes=concept_bytes(concept))

    return run


def train_dreambooth_lora_same(workdir: Path, **overrides: Any):
    """DreamBooth-LoRA (rank 8 + text-encoder LoRA, prior preservation) with Custom Diffusion's
    ``demo-world`` steps, batch, class images and instance prompt — the comparison the paper makes."""
    from trainers import get_trainer
    from trainers.lora import PRESETS as DREAMBOOTH_PRESETS
    from trainers.runner import train

    entry = get_trainer("dreambooth")
    same = {k: SETTINGS[k] for k in ("steps", "batch_size", "num_class_images", "class_steps", "class_guidance",
                                     "prior_weight")}
    values = dict(DREAMBOOTH_PRESETS["demo-world"], **same, instance_prompt="photo of a {}", class_prompt=None,
                  **overrides)

    def run(images_dir: Path, seed: int, lr_scale: float) -> Trained:
        base = _demo_base()
        cfg = entry.resolve(images=str(images_dir), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                            token="sks", out=str(workdir / f"dreambooth-same-{seed}-{lr_scale:g}.safetensors"),
                            class_cache_dir=str(workdir / "class-images"),
                            **(values | {"lr": values["lr"] * lr_scale}))
        concept = train(entry, cfg, base).concept
        return Trained(subject=f"{concept.trigger.strip('<>')} {concept.class_word}",
                       generate=_applied_generator(base, concept), size_bytes=concept_bytes(concept))

    return run


# The demo-world preset's tests are opt-in (-m slow): the defaults tests (test_defaults_custom_diffusion.py)
# supersede them in CI, as for every other trainer.
@pytest.mark.slow
def test_custom_diffusion_learns(tmp_path):
    assert_learns(train_custom_diffusion(tmp_path), tmp_path, seeds=(0,), name="Custom Diffusion")


@pytest.mark.slow  # opt-in: CI's time budget (measured: fidelity 1.000, editability 0.975)
def test_custom_diffusion_learns_on_a_second_seed(tmp_path):
    assert_learns(train_custom_diffusion(tmp_path), tmp_path, seeds=(1,), name="Custom Diffusion")


@pytest.mark.slow
def test_custom_diffusion_at_learning_rate_zero_does_not_learn(tmp_path):
    assert_does_not_learn(train_custom_diffusion(tmp_path), tmp_path, name="Custom Diffusion")
