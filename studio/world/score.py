"""Scores of a trained concept, read by the world's oracle.

* **fidelity** — mean oracle probability that an image shows the concept's identity;
* **editability** — fraction of images in which the oracle reads the attribute value the prompt
  asked for (the context the concept was put in).

Both are measured on the task's evaluation prompts and bracketed by two references:

* the **baseline**: the base model prompted with the bare class word ("a photo of a circle on a
  pink background") — what you get without the concept;
* the **upper bound**: real renders of the concept in each evaluation context.

A *generator* is any callable ``generate(prompts, seed) -> list[PIL.Image]`` returning one image
per prompt, deterministic in ``seed``; :func:`pipeline_generator` makes one from a diffusers
pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from studio.world.oracle import Oracle, load_oracle
from studio.world.render import VOCABULARY
from studio.world.task import CONCEPT, ConceptTask, target_pairs

Generator = Callable[[Sequence[str], int], list[Image.Image]]

GUIDANCE_SCALE = 4.0
"""Classifier-free guidance used for the world's generations."""
NUM_STEPS = 20
"""Sampler steps used for the world's generations."""

_ORACLE: dict[str, Oracle] = {}


def _oracle(oracle: Oracle | None) -> Oracle:
    if oracle is not None:
        return oracle
    if "cpu" not in _ORACLE:
        _ORACLE["cpu"] = load_oracle("cpu")
    return _ORACLE["cpu"]


def fidelity(images: Sequence[Image.Image], oracle: Oracle | None = None) -> float:
    """Mean oracle probability that each image shows the concept (in [0, 1])."""
    if not images:
        raise ValueError("fidelity of no images")
    return float(_oracle(oracle).read(images)["identity"].mean())


def editability(
    images: Sequence[Image.Image],
    targets: Sequence[tuple[str, str]],
    oracle: Oracle | None = None,
) -> float:
    """Fraction of images whose attribute ``targets[i] = (name, value)`` the oracle reads as asked (for a
    compound target ``("background+size", "teal+small")``, every attribute named)."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    if not images:
        raise ValueError("editability of no images")
    probs = _oracle(oracle).read(images)
    hits = [
        all(int(probs[name][i].argmax()) == VOCABULARY[name].index(value) for name, value in target_pairs(target))
        for i, target in enumerate(targets)
    ]
    return sum(hits) / len(hits)


def joint_success(
    images: Sequence[Image.Image],
    targets: Sequence[tuple[str, str]],
    oracle: Oracle | None = None,
) -> float:
    """Fraction of images that show the concept (oracle identity probability > 0.5) *and* every attribute
    the prompt asked for: fidelity and editability on the same image, which neither mean shows alone."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    if not images:
        raise ValueError("joint success of no images")
    probs = _oracle(oracle).read(images)
    hits = [
        float(probs["identity"][i]) > 0.5 and all(
            int(probs[name][i].argmax()) == VOCABULARY[name].index(value) for name, value in target_pairs(target))
        for i, target in enumerate(targets)
    ]
    return sum(hits) / len(hits)


@dataclass(frozen=True)
class Scores:
    fidelity: float
    editability: float
    n_images: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"fidelity {self.fidelity:.3f}, editability {self.editability:.3f} (n={self.n_images})"


def score_images(
    images: Sequence[Image.Image],
    targets: Sequence[tuple[str, str]],
    oracle: Oracle | None = None,
) -> Scores:
    return Scores(fidelity(images, oracle), editability(images, targets, oracle), len(images))


def evaluate(
    generate: Generator,
    subject: str,
    task: ConceptTask = CONCEPT,
    per_prompt: int = 4,
    seed: int = 0,
    oracle: Oracle | None = None,
) -> Scores:
    """Generate ``per_prompt`` images for each evaluation prompt (with ``subject``) and score them."""
    prompts = [p for p in task.prompts(subject) for _ in range(per_prompt)]
    targets = [t for t in task.targets() for _ in range(per_prompt)]
    images = generate(prompts, seed)
    if len(images) != len(prompts):
        raise ValueError(f"the generator returned {len(images)} images for {len(prompts)} prompts")
    return score_images(images, targets, oracle)


def baseline(
    generate: Generator,
    task: ConceptTask = CONCEPT,
    per_prompt: int = 4,
    seed: int = 0,
    oracle: Oracle | None = None,
) -> Scores:
    """The base model prompted with the bare class word: fidelity without the concept."""
    return evaluate(generate, task.class_word, task, per_prompt, seed, oracle)


def upper_bound(
    task: ConceptTask = CONCEPT,
    per_prompt: int = 4,
    seed: int = 0,
    oracle: Oracle | None = None,
) -> Scores:
    """Real renders of the concept in the evaluation contexts: the best a method can score."""
    images = task.real_images(per_prompt=per_prompt, seed=seed)
    targets = [t for t in task.targets() for _ in range(per_prompt)]
    return score_images(images, targets, oracle)


# ----------------------------------------------------------------------------------------------
# Generation with a diffusers pipeline
# ----------------------------------------------------------------------------------------------


def pipeline_generator(
    pipe,
    num_inference_steps: int = NUM_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
    encode: Callable[[list[str]], torch.Tensor] | None = None,
) -> Generator:
    """Wrap a ``StableDiffusionPipeline`` as a generator (one image per prompt).

    ``encode`` optionally turns prompts into ``prompt_embeds`` ``(B, 77, D)`` itself (a method
    that edits the text conditioning); the negative prompt is then ``encode([""])``.
    Each batch ``k`` draws its noise from ``torch.Generator().manual_seed(seed + k)``.
    """

    def generate(prompts: Sequence[str], seed: int) -> list[Image.Image]:
        images: list[Image.Image] = []
        prompts = list(prompts)
        for k, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start : start + batch_size]
            kwargs: dict = {}
            if encode is None:
                kwargs["prompt"] = chunk
            else:
                with torch.no_grad():
                    kwargs["prompt_embeds"] = encode(chunk)
                    kwargs["negative_prompt_embeds"] = encode([""] * len(chunk))
            out = pipe(
                **kwargs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed + k),
            )
            images.extend(out.images)
        return images

    return generate
