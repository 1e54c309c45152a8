"""NeTI learns the world's concept (see :mod:`tests.learning.harness` for the bars).

The studio's own trainer (:class:`trainers.neti.NetiTrainer`, shared loop) trains the mapper on
the concept's photos with prompts in the world's grammar ("a photo of a <hrt> circle"); the
concept is applied with :class:`studio.methods.neti.NeTI` for generation.

``python -m tests.learning.test_neti_learns`` prints the **truncation curve**: fidelity and
editability of one trained mapper at several strengths (strength → kept hidden dimensions, see
:func:`studio.methods.neti.truncation_for`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from trainers.neti import PRESETS as NETI_PRESETS

# The hand-tuned ``demo-world`` preset: opt-in (``pytest -m slow``) since the default settings are what CI
# learns with, on two bases (test_defaults_*.py); kept as the library of bench/world_compare.py.
pytestmark = [pytest.mark.learning, pytest.mark.slow]

PLACEHOLDER = "<hrt>"
CLASS_WORD = "circle"
WORLD_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a rendering of a {}", "a {}")
PRESET = dict(NETI_PRESETS["demo-world"])  # 120 steps, lr 8e-3, batch 8
STEPS = PRESET["steps"]


def _base() -> Any:
    import torch

    from studio.models import describe
    from tests.learning.harness import base_pipeline

    return describe(base_pipeline(), spec="demo", name="demo", identity="world-base", device=torch.device("cpu"),
                    dtype=torch.float32)


def train_concept(images_dir: Path, seed: int, lr_scale: float = 1.0, steps: int = STEPS) -> Any:
    """Train a NeTI mapper on ``images_dir``; returns the concept (lr 8e-3 × ``lr_scale``)."""
    from trainers.loop import run_training
    from trainers.neti import NetiTrainConfig, NetiTrainer

    class WorldTrainer(NetiTrainer):
        def prompts(self, templates: list[str], examples: list[Any]) -> list[str]:
            # the loop picked a template per sample; map it onto the world's grammar deterministically
            subject = f"{self.token} {CLASS_WORD}"
            return [WORLD_TEMPLATES[sum(map(ord, t)) % len(WORLD_TEMPLATES)].format(subject) for t in templates]

    base = _base()
    cfg = NetiTrainConfig(images=str(images_dir), class_word=CLASS_WORD, token=PLACEHOLDER, steps=steps,
                          lr=PRESET["lr"] * lr_scale, batch_size=PRESET["batch_size"],
                          grad_accum=PRESET["grad_accum"], seed=seed, log_every=0,
                          resolution=base.native_size)
    result = run_training(base, WorldTrainer(base, cfg, PLACEHOLDER), cfg, method="neti", save=False)
    return result.concept


@contextlib.contextmanager
def _applied(concept: Any, strength: float) -> Iterator[None]:
    from studio.methods import get_method

    handle = get_method("neti").apply(_base(), concept, strength=strength)
    try:
        yield
    finally:
        handle.remove()


def trained(concept: Any, strength: float = 1.0) -> Any:
    from studio.world.score import pipeline_generator
    from tests.learning.harness import Trained, base_pipeline, concept_bytes

    plain = pipeline_generator(base_pipeline())

    def generate(prompts: Sequence[str], seed: int) -> list[Any]:
        with _applied(concept, strength):
            return plain(prompts, seed)

    return Trained(subject=f"{PLACEHOLDER} {CLASS_WORD}", generate=generate, size_bytes=concept_bytes(concept))


def train_neti(images_dir: Path, seed: int, lr_scale: float) -> Any:
    """The harness's ``TrainFn``."""
    return trained(train_concept(images_dir, seed, lr_scale))


def test_neti_learns(tmp_path):
    from tests.learning.harness import assert_learns

    assert_learns(train_neti, tmp_path, seeds=(0, 1), name="NeTI")


def test_neti_at_learning_rate_zero_does_not_learn(tmp_path):
    from tests.learning.harness import assert_does_not_learn

    assert_does_not_learn(train_neti, tmp_path, name="NeTI")


def truncation_curve(workdir: Path, strengths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), seed: int = 0
                     ) -> list[tuple[float, Any]]:
    """Fidelity/editability of one trained mapper at each strength."""
    from studio.world.score import evaluate
    from studio.world.task import CONCEPT
    from tests.learning.harness import PER_PROMPT

    images_dir = Path(workdir) / f"concept-seed{seed}"
    CONCEPT.write_training_folder(images_dir, seed=seed)
    concept = train_concept(images_dir, seed)
    out = []
    for s in strengths:
        t = trained(concept, s)
        out.append((s, evaluate(t.generate, t.subject, CONCEPT, per_prompt=PER_PROMPT, seed=seed)))
    return out


if __name__ == "__main__":
    import tempfile

    from studio.methods.neti import truncation_for
    from tests.learning.harness import references

    with tempfile.TemporaryDirectory() as tmp:
        print(references())
        for s, scores in truncation_curve(Path(tmp)):
            print(f"strength {s:.2f} (h[:{truncation_for(s, 128) or 128}]): {scores}")
