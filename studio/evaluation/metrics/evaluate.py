"""``evaluate``: score already-generated images against their prompts and concepts' photos.

Generation is not done here: the caller (``studio.generation``, a notebook, a test) passes
``{prompt: [PIL images]}``. What is computed:

- CLIP-T for every image (text rule: :mod:`studio.evaluation.metrics.texts`);
- CLIP-I (and DINO, given an ``identity_scorer``) per concept, over the images whose prompt names
  the concept's trigger — every image when a single concept is evaluated;
- CP-CLIP and TI-CLIP (given a ``detector``) for images whose prompt names at least one concept.

Summary keys: ``"clip_t"``, ``"clip_i"``, ``"dino"``, ``"cp_clip"``, ``"ti_clip"``; with several
concepts also ``"clip_i[<name>]"`` / ``"dino[<name>]"`` per concept, and ``"clip_i"`` / ``"dino"``
are then the mean over concepts of the per-concept values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluation.metrics.cache import CachedScorer, EmbeddingCache
from studio.evaluation.metrics.detectors import DEFAULT_CROP_PADDING, Detector
from studio.evaluation.metrics.formulas import MetricSummary, clip_i, clip_t, dino, matched_cosine, summarize
from studio.evaluation.metrics.multiconcept import cp_clip_image
from studio.evaluation.metrics.report import ImageRecord, Report
from studio.evaluation.metrics.scorers import Scorer
from studio.evaluation.metrics.texts import TEXT_MODES, TextMode, clip_t_text, context_text, mentions


@dataclass(frozen=True)
class EvalConcept:
    """A concept as evaluation sees it.

    ``trigger`` is the token written in prompts (``"<hrt>"``; ``"<hrt:0.8>"`` also matches);
    ``class_noun`` replaces it in CLIP-T's text and is the detector's query label; ``references`` are
    the concept's real photos; ``name`` labels it in the report (default: the trigger).
    """

    trigger: str
    class_noun: str
    references: Sequence[Image.Image]
    name: str | None = None

    @property
    def label(self) -> str:
        """Display name."""
        return self.name or self.trigger


def _concepts(concepts: EvalConcept | Sequence[EvalConcept]) -> list[EvalConcept]:
    items = [concepts] if isinstance(concepts, EvalConcept) else list(concepts)
    if not items:
        raise StudioError("evaluate needs at least one concept (trigger, class noun, reference photos).")
    names = [c.label for c in items]
    if len(set(names)) != len(names):
        raise StudioError(f"Concept names must be unique, got {names}.")
    for concept in items:
        if not concept.references:
            raise StudioError(f"Concept '{concept.label}' has no reference photos to compare with.")
    return items


def evaluate(
    images_by_prompt: Mapping[str, Sequence[Image.Image]],
    concepts: EvalConcept | Sequence[EvalConcept],
    scorer: Scorer,
    *,
    identity_scorer: Scorer | None = None,
    detector: Detector | None = None,
    text_mode: TextMode = "class_noun",
    crop_padding: float = DEFAULT_CROP_PADDING,
    context_texts: Mapping[str, str] | None = None,
    cache: EmbeddingCache | None = None,
) -> Report:
    """Score generated images; nothing is generated or written here.

    Args:
        images_by_prompt: ``{prompt: [images generated from it]}``; prompts contain the triggers.
        concepts: the concept(s) being evaluated.
        scorer: CLIP-like scorer (images and texts) for CLIP-T, CLIP-I, CP-CLIP and TI-CLIP.
        identity_scorer: image scorer for the DINO score (e.g. :class:`~studio.evaluation.metrics.scorers.DinoScorer`).
        detector: enables CP-CLIP / TI-CLIP (:mod:`studio.evaluation.metrics.detectors`).
        text_mode: which text CLIP-T scores (``"class_noun"``, ``"remove"``, ``"keep"``).
        crop_padding: CP-CLIP crop padding (fraction of the box per side).
        context_texts: TI-CLIP text per prompt, overriding the automatic concept removal.
        cache: embedding cache (shared across calls to skip re-encoding); default: in memory, this call.

    Returns:
        A :class:`~studio.evaluation.metrics.report.Report`.
    """
    # 1. Validate and flatten the inputs (image order = prompt order, then position).
    items = _concepts(concepts)
    if text_mode not in TEXT_MODES:
        raise StudioError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}.")
    flat = [(prompt, k, image) for prompt, group in images_by_prompt.items() for k, image in enumerate(group)]
    if not flat:
        raise StudioError("No generated images were given to evaluate.")
    cache = cache if cache is not None else EmbeddingCache()
    clip = CachedScorer(scorer, cache)
    ident = CachedScorer(identity_scorer, cache) if identity_scorer is not None else None
    nouns = {c.trigger: c.class_noun for c in items}
    single = len(items) == 1

    # 2. CLIP-T: every image against its prompt's scored text.
    image_embeds = clip.embed_images([image for _, _, image in flat])  # (N, D)
    texts = [clip_t_text(prompt, nouns, text_mode) for prompt, _, _ in flat]
    clip_t_scores = clip_t(image_embeds, clip.embed_texts(texts), clip.name)
    records = [
        ImageRecord(prompt, k, text, float(score))
        for (prompt, k, _), text, score in zip(flat, texts, clip_t_scores.per_image)
    ]
    summaries: dict[str, MetricSummary] = {"clip_t": clip_t_scores.summary}

    # 3. CLIP-I / DINO per concept, all pairs (images naming the concept) x (its references).
    ident_embeds = ident.embed_images([image for _, _, image in flat]) if ident is not None else None
    reference_embeds = {c.label: clip.embed_images(c.references) for c in items}  # name -> (R, D)
    for concept in items:
        rows = [i for i, (prompt, _, _) in enumerate(flat) if single or mentions(prompt, concept.trigger)]
        if not rows:
            continue
        per_concept = [("clip_i", clip_i, image_embeds, reference_embeds[concept.label], clip.name)]
        if ident is not None and ident_embeds is not None:
            per_concept.append(("dino", dino, ident_embeds, ident.embed_images(concept.references), ident.name))
        for metric, formula, embeds, refs, backbone in per_concept:
            scores = formula(embeds[rows], refs, backbone)
            summaries[f"{metric}[{concept.label}]"] = scores.summary
            for row, value in zip(rows, scores.per_image):
                getattr(records[row], metric)[concept.label] = float(value)
    for metric, backbone in (("clip_i", clip.name), ("dino", ident.name if ident else "")):
        parts = [summaries[f"{metric}[{c.label}]"] for c in items if f"{metric}[{c.label}]" in summaries]
        if single and parts:
            summaries[metric] = parts[0]
            del summaries[f"{metric}[{items[0].label}]"]
        elif parts:
            summaries[metric] = MetricSummary(
                metric,
                backbone,
                sum(p.mean for p in parts) / len(parts),
                float("nan"),
                sum(p.count for p in parts),
            )

    # 4. CP-CLIP and TI-CLIP for images whose prompt requests concepts.
    if detector is not None:
        _multi_concept(
            flat, records, items, reference_embeds, clip, image_embeds, detector, crop_padding, context_texts
        )
        for metric in ("cp_clip", "ti_clip"):
            values = [getattr(r, metric) for r in records if getattr(r, metric) is not None]
            summaries[metric] = summarize(metric, values, clip.name)

    backbones = {"clip": clip.name}
    if ident is not None:
        backbones["dino"] = ident.name
    if detector is not None:
        backbones["detector"] = str(getattr(detector, "name", type(detector).__name__))
    settings = {
        "clip_t_text": text_mode,
        "crop_padding": crop_padding,
        "concepts": [
            {"name": c.label, "trigger": c.trigger, "class_noun": c.class_noun, "references": len(c.references)}
            for c in items
        ],
        "images": len(flat),
        "prompts": len(images_by_prompt),
    }
    return Report(summaries, records, backbones, settings)


def _multi_concept(
    flat: list[tuple[str, int, Image.Image]],
    records: list[ImageRecord],
    items: list[EvalConcept],
    reference_embeds: Mapping[str, torch.Tensor],
    clip: CachedScorer,
    image_embeds: torch.Tensor,
    detector: Detector,
    crop_padding: float,
    context_texts: Mapping[str, str] | None,
) -> None:
    """Fill ``cp_clip``/``ti_clip`` (and their texts/details) of the records, in place."""
    nouns = {c.trigger: c.class_noun for c in items}
    ti_rows: list[int] = []
    ti_texts: list[str] = []
    for i, (prompt, _, image) in enumerate(flat):
        requested = [c for c in items if mentions(prompt, c.trigger)]
        if not requested:
            continue
        result = cp_clip_image(
            image,
            [c.class_noun for c in requested],
            [reference_embeds[c.label] for c in requested],
            clip,
            detector,
            names=[c.label for c in requested],
            padding=crop_padding,
        )
        records[i].cp_clip = result.score
        records[i].cp_clip_detail = result.to_dict()
        text = context_texts[prompt] if context_texts and prompt in context_texts else context_text(prompt, nouns)
        records[i].context_text = text
        if text:
            ti_rows.append(i)
            ti_texts.append(text)
    if ti_rows:
        values = matched_cosine(image_embeds[ti_rows], clip.embed_texts(ti_texts))  # (n,)
        for i, value in zip(ti_rows, values):
            records[i].ti_clip = float(value)
