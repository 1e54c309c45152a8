"""Generating the images an evaluation scores: batched, one CPU generator per seed.

:func:`render_images` applies the concepts (as :func:`studio.generation.generate` does) and renders
``seeds`` images per prompt; :func:`render_batch` is the batched pipeline call the training curve
uses too (with :func:`live_text`, the trigger as the trainer currently has it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluation.protocols import dedupe_class
from studio.generation import (
    ConceptEntry,
    ConceptUse,
    GenerateConfig,
    applied,
    effective_strengths,
    parameters_text,
)
from studio.methods.attention import cfg_layout
from studio.methods.decor import DEFAULT_STRENGTH as DECOR_STRENGTH
from studio.methods.decor import decor_applied
from studio.prompts import StageStrengths, rewrite


@torch.no_grad()
def render_batch(pipe: Any, texts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                 size: int, batch_size: int = 8) -> list[Image.Image]:
    """One image per ``(text, seed)``, ``batch_size`` per pipeline call, each drawn from its own CPU
    generator seeded with its seed (the same noise as a one-image call with that seed)."""
    images: list[Image.Image] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                   generator=gens, output_type="pil")
        images.extend(out.images)
    return images


def render_images(base: Any, uses: Sequence[ConceptEntry], prompts: Sequence[str], *,
                  seeds: int, seed: int = 0, steps: int, guidance: float, batch_size: int = 8,
                  notes: list[str] | None = None, decor_words: Sequence[str] = (),
                  decor_strength: float = DECOR_STRENGTH) -> dict[str, list[Image.Image]]:
    """``{prompt: [seeds images]}`` with the concepts applied (``(concept, default strength, source)``, and
    optionally a 4th item, the ``--concept FILE@0-4`` per-stage strengths, as :func:`studio.generation.generate`);
    prompts resolving to the same strengths share one application of the concepts. Images carry
    ``parameters``/``studio`` infos like ``generate``'s.
    ``decor_words`` / ``decor_strength``: DECOR on every image, as :class:`GenerateConfig`'s fields."""
    words = GenerateConfig(prompt=prompts[0] if prompts else "-", seed=seed, steps=steps, guidance=guidance,
                           decor_words=list(decor_words), decor_strength=decor_strength).decor_words  # validates
    if not 1 <= seeds <= 64:
        raise StudioError(f"seeds (images per prompt) must be between 1 and 64, got {seeds}.")
    size = int(base.native_size)
    nouns = [entry[0].class_word for entry in uses]
    groups: dict[tuple[tuple[float, tuple[float, ...] | None], ...], list[str]] = {}
    resolved_of = {p: effective_strengths(p, "", uses) for p in prompts}
    for prompt in prompts:
        groups.setdefault(tuple((r.strength, r.stages) for r in resolved_of[prompt]), []).append(prompt)
    out: dict[str, list[Image.Image]] = {p: [] for p in prompts}
    for group in groups.values():
        resolved = resolved_of[group[0]]
        # as generate: the hooks that edit only the conditional CFG rows (Perfusion, NeTI …) are told which
        # rows those are (SD 3 / FLUX have no studio processor)
        layout = contextlib.nullcontext() if getattr(base, "is_flow", False) else \
            cfg_layout(base.pipe.unet, guided=guidance > 1)
        with applied(base, resolved, notes) as replacements, \
                decor_applied(base.pipe, [rewrite(w, replacements) for w in words], decor_strength,
                              guided=guidance > 1), layout:
            jobs = [(p, seed + i) for p in group for i in range(seeds)]
            texts = [dedupe_class(rewrite(p, replacements), nouns) for p, _ in jobs]
            images = render_batch(base.pipe, texts, [s for _, s in jobs], steps=steps, guidance=guidance,
                                  size=size, batch_size=batch_size)
        for (prompt, s), text, image in zip(jobs, texts, images):
            cfg = GenerateConfig(prompt=prompt, seed=s, steps=steps, guidance=guidance, width=size, height=size,
                                 concepts=[ConceptUse(r.source, r.strength, None if r.stages is None else
                                                      StageStrengths(values=r.stages)) for r in resolved],
                                 decor_words=words, decor_strength=decor_strength)
            image.info["parameters"] = parameters_text(cfg, seed=s, base=base, width=size, height=size,
                                                       resolved=resolved)
            image.info["studio"] = json.dumps({
                "prompt": prompt, "text": text, "seed": s, "steps": steps, "guidance": guidance, "width": size,
                "height": size, "base": base.spec, "base_identity": base.identity,
                "concepts": [{"source": r.source, "name": r.concept.name, "trigger": r.concept.trigger,
                              "strength": r.strength} | ({"stages": list(r.stages)} if r.stages is not None else {})
                             for r in resolved],
                "decor_words": cfg.decor_words, "decor_strength": cfg.decor_strength})
            out[prompt].append(image)
    return out


def live_text(prompt: str, trigger: str, text: str, class_word: str) -> str:
    """A display prompt (``"a <tok> dog in the snow"``) with the trigger replaced by the trainer's live
    text (``"<tok> <tok>#1"``; a class noun repeated by it is collapsed)."""
    return dedupe_class(rewrite(prompt, {trigger: text}), [class_word])
