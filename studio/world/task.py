"""The concept task: an identity the base model never saw, its photos, and its evaluation prompts.

The concept is a *purple dotted circle*: an instance of the class "circle" whose features
(colour purple, white dots) the base model knows from other shapes and other circles, but never
saw together — ``scripts/build_world.py`` leaves every purple dotted circle out of the base
model's training data. Its training photos show it only large, on a white or gray background;
the evaluation prompts put it where the photos never did: on four other backgrounds, and small,
each prompt paired with the attribute value the oracle must read in the result (editability).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from studio.errors import StudioError
from studio.world.render import RESOLUTION, Attributes, describe, render


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation context: a prompt template and the attribute value it asks for.

    ``template`` holds one ``{}`` for the subject (``"<hrt> circle"``, or the bare class word for
    the baseline); ``attribute``/``value`` is what the oracle must read in the image. A prompt that
    changes several attributes at once names them joined by ``+`` (``"background+size"`` /
    ``"teal+small"``): the image counts as edited only when the oracle reads every one of them.
    """

    template: str
    attribute: str
    value: str

    def format(self, subject: str) -> str:
        return self.template.format(subject)

    def pairs(self) -> list[tuple[str, str]]:
        """``[(attribute, value), …]`` the oracle must read (one pair, or several for a compound prompt)."""
        return target_pairs((self.attribute, self.value))


def target_pairs(target: tuple[str, str]) -> list[tuple[str, str]]:
    """Split a target ``("background+size", "teal+small")`` into ``[("background", "teal"), ("size", "small")]``."""
    names, values = target[0].split("+"), target[1].split("+")
    if len(names) != len(values):
        raise ValueError(f"target {target!r} names {len(names)} attributes but gives {len(values)} values")
    return list(zip(names, values, strict=True))


def _context_prompts(backgrounds: Sequence[str], sizes: Sequence[str]) -> tuple[EvalPrompt, ...]:
    prompts = [
        EvalPrompt(describe(noun="{}", background=bg), "background", bg) for bg in backgrounds
    ]
    prompts += [EvalPrompt(describe(noun="{}", size=size), "size", size) for size in sizes]
    return tuple(prompts)


def _two_attribute_prompts(backgrounds: Sequence[str], size: str) -> tuple[EvalPrompt, ...]:
    """Prompts that change the background *and* the size at once (both unseen in the photos)."""
    return tuple(EvalPrompt(describe(noun="{}", background=bg, size=size), "background+size", f"{bg}+{size}")
                 for bg in backgrounds)


@dataclass(frozen=True)
class ConceptTask:
    """A personalization task in the world.

    Attributes:
        identity: the concept's own features, as attributes (shape = the class).
        class_word: the class noun, as used in prompts ("a photo of a <hrt> circle").
        train_backgrounds / train_sizes: the contexts of its training photos.
        eval_prompts: contexts absent from the training photos, each with its oracle target.
    """

    identity: dict[str, str] = field(
        default_factory=lambda: {"shape": "circle", "colour": "purple", "pattern": "dotted"}
    )
    class_word: str = "circle"
    train_backgrounds: tuple[str, ...] = ("white", "gray")
    train_sizes: tuple[str, ...] = ("large",)
    eval_prompts: tuple[EvalPrompt, ...] = _context_prompts(("black", "pink", "brown", "teal"), ("small",))

    def __post_init__(self) -> None:
        for prompt in self.eval_prompts:
            for attribute, value in prompt.pairs():
                context = {
                    "background": self.train_backgrounds,
                    "size": self.train_sizes,
                }.get(attribute, ())
                if value in context:
                    raise ValueError(
                        f"evaluation prompt {prompt.template!r} asks for {attribute} "
                        f"{value!r}, which the training photos already show"
                    )

    # ------------------------------------------------------------------------------------------
    def attributes(self, **context: str) -> Attributes:
        """The concept in a given context (background, size)."""
        defaults = {"background": "white", "size": "large"}
        return Attributes(**{**defaults, **context, **self.identity})

    def is_identity(self, attributes: Attributes) -> bool:
        return all(getattr(attributes, k) == v for k, v in self.identity.items())

    def description(self) -> str:
        """The concept in the world's own words ("purple dotted circle")."""
        return " ".join(self.identity[k] for k in ("colour", "pattern", "shape"))

    def training_images(self, n: int = 5, seed: int = 0, size: int = RESOLUTION) -> list[Image.Image]:
        """``n`` renders of the concept in its training contexts (deterministic in ``seed``), ``size`` px."""
        if n < 1:
            raise StudioError(f"A concept needs at least one training image; n={n} was asked.")
        rng = random.Random(f"concept-train/{seed}")
        images = []
        for i in range(n):
            context = {
                "background": self.train_backgrounds[i % len(self.train_backgrounds)],
                "size": self.train_sizes[(i // len(self.train_backgrounds)) % len(self.train_sizes)],
            }
            images.append(render(self.attributes(**context), jitter=rng.randrange(2**31), size=size))
        return images

    def write_training_folder(self, directory: str | Path, n: int = 5, seed: int = 0,
                              size: int = RESOLUTION) -> list[Path]:
        """Write the training images (``size`` px) as ``NN.png`` into ``directory`` (created); return the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.training_images(n=n, seed=seed, size=size)):
            path = directory / f"{i:02d}.png"
            image.save(path)
            paths.append(path)
        return paths

    def prompts(self, subject: str) -> list[str]:
        """The evaluation prompts with ``subject`` in place ("<hrt> circle" or "circle")."""
        return [p.format(subject) for p in self.eval_prompts]

    def targets(self) -> list[tuple[str, str]]:
        """``(attribute, value)`` the oracle must read, one per evaluation prompt."""
        return [(p.attribute, p.value) for p in self.eval_prompts]

    def real_images(self, per_prompt: int = 4, seed: int = 0) -> list[Image.Image]:
        """Renders of the concept in each evaluation context (the upper bound's images).

        Ordered prompt-major: ``per_prompt`` images for the first prompt, then the next.
        """
        rng = random.Random(f"concept-real/{seed}")
        images = []
        for prompt in self.eval_prompts:
            for _ in range(per_prompt):
                context = {
                    "background": rng.choice(("white", "gray", "black", "pink", "brown", "teal")),
                    "size": rng.choice(("small", "large")),
                    **dict(prompt.pairs()),
                }
                images.append(render(self.attributes(**context), jitter=rng.randrange(2**31)))
        return images


CONCEPT = ConceptTask()
"""The world's concept task (the purple dotted circle)."""

HARD_CONCEPT = ConceptTask(eval_prompts=_two_attribute_prompts(("black", "pink", "brown", "teal"), "small"))
"""The same concept, evaluated on prompts that change two attributes at once ("a photo of a small <hrt>
circle on a teal background"): harder to edit than :data:`CONCEPT`'s one-attribute prompts, where most
methods' editability is saturated (≈ 1.0). Used by ``bench/world_compare.py`` to let regularizers show."""
