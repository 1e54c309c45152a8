"""Learning test: the world's IP-Adapter, fine-tuned on the concept's photos with the studio's adapter
trainer, renders the concept from one reference photo in contexts the photos never showed.

The adapter (``studio/assets/world_adapter``, built by ``scripts/build_world_adapter.py`` with an
image encoder trained on the world) never saw a purple dotted circle. Each seed: fine-tune it on
the concept's photos (``trainers/zeroshot.py``), then generate the task's evaluation prompts with the
bare class word ("a photo of a circle on a pink background") and one of the photos as the image
prompt. Scored by the oracle against the class-word baseline (:mod:`tests.learning.harness`).

Control: the same fine-tuned adapter with a *red striped square* as the reference must not render
the concept (it transfers the reference's identity, it did not memorise the concept).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from studio.world import CONCEPT, render
from tests.learning.harness import Trained, measure, references

pytestmark = pytest.mark.learning

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "studio" / "assets" / "world_adapter"
STEPS = 150
LR = 1e-4
SCALE = 1.0


@functools.lru_cache(maxsize=1)
def demo_base():
    from studio.models import load_base

    base = load_base("demo", device="cpu")
    base.pipe.set_progress_bar_config(disable=True)
    return base


def reference_generator(adapter_dir: Path, reference):
    """A world generator rendering with ``reference`` as the image prompt through ``adapter_dir``."""
    from studio.generation import ResolvedConcept, applied
    from studio.methods.attention import cfg_layout
    from studio.methods.zeroshot import make_zeroshot_concept
    from studio.world import pipeline_generator

    base = demo_base()
    concept = make_zeroshot_concept([reference], str(adapter_dir), image_encoder=str(ADAPTER_DIR / "image_encoder"),
                                    name="reference")
    plain = pipeline_generator(base.pipe)

    def generate(prompts, seed):
        with applied(base, [ResolvedConcept(concept, "reference", SCALE)]), cfg_layout(base.pipe.unet, guided=True):
            return plain(prompts, seed)

    return generate


def fine_tune(images_dir: Path, seed: int, lr_scale: float) -> Path:
    from trainers import get_trainer
    from trainers.runner import train

    entry = get_trainer("adapter")
    out = images_dir.parent / f"adapter-{images_dir.name}-lr{lr_scale:g}"
    cfg = entry.resolve(images=str(images_dir), adapter=str(ADAPTER_DIR), out=str(out), steps=STEPS,
                      lr=LR * lr_scale, batch_size=5, seed=seed, class_word=CONCEPT.class_word,
                      save_image_encoder=False, log_every=0)
    return train(entry, cfg, demo_base()).path


def train_adapter(images_dir: Path, seed: int, lr_scale: float) -> Trained:
    """The harness's trainer protocol: fine-tune, then render from the first photo."""
    adapter = fine_tune(images_dir, seed, lr_scale)
    from PIL import Image

    reference = Image.open(sorted(images_dir.glob("*.png"))[0]).convert("RGB")
    size = sum(f.stat().st_size for f in adapter.rglob("*.safetensors") if "image_encoder" not in f.parts)
    return Trained(subject=CONCEPT.class_word, generate=reference_generator(adapter, reference), size_bytes=size)


def test_fine_tuned_adapter_renders_the_concept_from_a_reference(tmp_path):
    refs = references()
    for seed in (0, 1):
        scores, seconds = measure(train_adapter, tmp_path, seed)
        print(f"adapter seed {seed}: {scores} in {seconds:.1f}s; {refs}")
        assert scores.fidelity >= refs.fidelity_bar, (scores, refs)
        assert scores.editability >= refs.editability_bar, (scores, refs)


def test_control_another_reference_does_not_give_the_concept(tmp_path):
    from studio.world import evaluate

    refs = references()
    images_dir = tmp_path / "concept-seed0"
    CONCEPT.write_training_folder(images_dir, seed=0)
    adapter = fine_tune(images_dir, 0, 1.0)
    square = render(CONCEPT.attributes().replace(shape="square", colour="red", pattern="striped"))
    scores = evaluate(reference_generator(adapter, square), CONCEPT.class_word, per_prompt=6, seed=0)
    print(f"adapter with a red striped square as reference: {scores}; {refs}")
    assert scores.fidelity < refs.fidelity_bar, (scores, refs)
