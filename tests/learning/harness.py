"""The learning harness: does a trainer *learn* the world's concept, not just run?

A trainer plugs in as a function

    train(images_dir: Path, seed: int, lr_scale: float) -> Trained

that trains on the PNGs in ``images_dir`` (the concept's photos, written by
``CONCEPT.write_training_folder``), with its learning rate multiplied by ``lr_scale`` (0 = the
negative control), and returns a :class:`Trained`: the words that stand for the concept in a
prompt (``subject``, e.g. ``"<hrt> circle"``) and a generator ``generate(prompts, seed) -> images``
(one 32×32 PIL image per prompt) that renders with the concept applied.

:func:`assert_learns` then generates the task's evaluation prompts, scores them with the oracle
and asserts, for every seed:

* fidelity ≥ baseline + 0.3, and ≥ half-way from the baseline to the upper bound;
* editability ≥ 0.9 × the base model's editability on the same prompts with the class word.

:func:`assert_does_not_learn` asserts that the same trainer at ``lr_scale=0`` misses the
fidelity bar (a permanent negative control: the bar is not so low that doing nothing passes).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from studio.world import DEMO_BASE_DIR, ORACLE_PATH
from studio.world.oracle import Oracle, load_oracle
from studio.world.score import Generator, Scores, baseline, evaluate, pipeline_generator, upper_bound
from studio.world.task import CONCEPT, ConceptTask

PER_PROMPT = 8
"""Images per evaluation prompt (5 prompts → 40 images per score)."""
FIDELITY_MARGIN = 0.3
FIDELITY_FRACTION = 0.5
EDITABILITY_FRACTION = 0.9


@dataclass
class Trained:
    """What a trainer hands back: how to name the concept, and how to render with it."""

    subject: str
    generate: Generator
    size_bytes: int | None = None  # the concept file's size, for the README's learning table


def concept_bytes(concept) -> int:
    """Size of ``concept`` saved as a studio ``.safetensors`` file."""
    import tempfile

    from studio.methods import save_concept

    with tempfile.TemporaryDirectory() as tmp:
        return save_concept(concept, Path(tmp) / "concept.safetensors").stat().st_size


TrainFn = Callable[[Path, int, float], Trained]


@dataclass(frozen=True)
class References:
    baseline: Scores  # the base model, class word only
    upper: Scores  # real renders of the concept

    @property
    def fidelity_bar(self) -> float:
        b, u = self.baseline.fidelity, self.upper.fidelity
        return max(b + FIDELITY_MARGIN, b + FIDELITY_FRACTION * (u - b))

    @property
    def editability_bar(self) -> float:
        return EDITABILITY_FRACTION * self.baseline.editability

    def __str__(self) -> str:
        return (
            f"baseline [{self.baseline}], upper bound [{self.upper}]; bars: fidelity ≥ "
            f"{self.fidelity_bar:.3f}, editability ≥ {self.editability_bar:.3f}"
        )


_WORLD = {"base": Path(DEMO_BASE_DIR), "oracle": Path(ORACLE_PATH)}


def use_world(base_dir: Path, oracle_path: Path) -> None:
    """Score against another build of the world (e.g. a snapshot of ``build_world.py``)."""
    _WORLD.update(base=Path(base_dir), oracle=Path(oracle_path))
    base_pipeline.cache_clear()
    oracle.cache_clear()
    references.cache_clear()


@functools.lru_cache(maxsize=1)
def oracle() -> Oracle:
    """The world's oracle (loaded once per process)."""
    return load_oracle("cpu", _WORLD["oracle"])


@functools.lru_cache(maxsize=2)
def base_pipeline(base_dir: Path | None = None):
    """The world's base model, or the one in ``base_dir`` (loaded once per process, CPU, float32,
    progress bars off)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir or _WORLD["base"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor())  # faster than SDPA at these head sizes on CPU
    return pipe


_REFERENCES: dict[tuple[int, int, int, Path | None], References] = {}


def references(task: ConceptTask = CONCEPT, per_prompt: int = PER_PROMPT, seed: int = 0,
               base_dir: Path | None = None) -> References:
    """Baseline (base model + class word) and upper bound (real renders), computed once per
    (task, per_prompt, seed, base) and world (a task holds dicts, so it is keyed by identity).
    ``base_dir``: another base of the same world (the second learnable base); default the world's."""
    key = (id(task), per_prompt, seed, base_dir)
    if key not in _REFERENCES:
        generate = pipeline_generator(base_pipeline(base_dir))
        _REFERENCES[key] = References(
            baseline=baseline(generate, task, per_prompt=per_prompt, seed=seed + 10_000, oracle=oracle()),
            upper=upper_bound(task, per_prompt=per_prompt, seed=seed, oracle=oracle()),
        )
    return _REFERENCES[key]


references.cache_clear = _REFERENCES.clear  # type: ignore[attr-defined]  # as for the lru_cached loaders


def measure(
    train: TrainFn,
    workdir: Path,
    seed: int,
    lr_scale: float = 1.0,
    task: ConceptTask = CONCEPT,
    per_prompt: int = PER_PROMPT,
    size: int | None = None,
) -> tuple[Scores, float]:
    """Train on the task's photos (seeded; rendered ``size`` px, default the world's 32) and score the
    result; returns (scores, seconds)."""
    images_dir = Path(workdir) / f"concept-seed{seed}"
    task.write_training_folder(images_dir, seed=seed, **({"size": size} if size else {}))
    t0 = time.perf_counter()
    trained = train(images_dir, seed, lr_scale)
    scores = evaluate(trained.generate, trained.subject, task, per_prompt=per_prompt, seed=seed, oracle=oracle())
    return scores, time.perf_counter() - t0


def assert_learns(
    train: TrainFn,
    workdir: Path,
    seeds: Sequence[int] = (0, 1),
    task: ConceptTask = CONCEPT,
    name: str = "trainer",
    base_dir: Path | None = None,
    size: int | None = None,
) -> list[Scores]:
    """Assert the learning bars for every seed; returns the scores (printed on failure). ``base_dir``
    and ``size``: another base of the world and its photos' size (the references follow the base)."""
    refs = references(task, base_dir=base_dir)
    results = []
    for seed in seeds:
        scores, seconds = measure(train, workdir, seed, 1.0, task, size=size)
        results.append(scores)
        print(f"{name} seed {seed}: {scores} in {seconds:.1f}s; {refs}")
        assert scores.fidelity >= refs.fidelity_bar, (
            f"{name} (seed {seed}) did not learn the concept: fidelity {scores.fidelity:.3f} < "
            f"bar {refs.fidelity_bar:.3f} ({refs})"
        )
        assert scores.editability >= refs.editability_bar, (
            f"{name} (seed {seed}) lost editability: {scores.editability:.3f} < "
            f"bar {refs.editability_bar:.3f} ({refs})"
        )
    return results


def assert_does_not_learn(
    train: TrainFn, workdir: Path, seed: int = 0, task: ConceptTask = CONCEPT, name: str = "trainer",
    base_dir: Path | None = None, size: int | None = None,
) -> Scores:
    """The negative control: the trainer at learning rate 0 must miss the fidelity bar."""
    refs = references(task, base_dir=base_dir)
    scores, seconds = measure(train, workdir, seed, 0.0, task, size=size)
    print(f"{name} at lr 0: {scores} in {seconds:.1f}s; {refs}")
    assert scores.fidelity < refs.fidelity_bar, (
        f"{name} at learning rate 0 passed the fidelity bar ({scores.fidelity:.3f} ≥ "
        f"{refs.fidelity_bar:.3f}): the bar does not measure learning"
    )
    return scores
