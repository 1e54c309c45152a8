"""Judges: the models that score generated images — CLIP (+ DINO, + a detector for CP-CLIP;
:mod:`studio.evaluation.metrics`) or the demo world's oracle (:class:`WorldJudge`).

:func:`load_judges` loads them once (one embedding cache, reused across strengths and training
steps); :func:`score_images` turns generated images into a :class:`~studio.evaluation.metrics.Report`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluation.metrics import (
    ClipScorer,
    Detector,
    DinoScorer,
    EmbeddingCache,
    EvalConcept,
    ImageRecord,
    Report,
    Scorer,
    evaluate,
)
from studio.evaluation.metrics.formulas import summarize
from studio.evaluation.metrics.scorers import DEFAULT_CLIP
from studio.evaluation.metrics.texts import TextMode

ScorerKind = Literal["clip", "oracle"]
DEFAULT_DETECTOR = "google/owlvit-base-patch32"  # CP-CLIP's detector when several concepts are evaluated


class WorldJudge:
    """The demo world's oracle as a judge (:mod:`studio.world`).

    Per image: *fidelity* = the oracle's probability that it shows the world's concept (the purple
    dotted circle — meaningful for concepts of that task only); *editability* = the fraction of the
    attributes the prompt asks for in the world's grammar ("on a pink background", "on the left")
    that the oracle reads as asked, ``None`` when the prompt asks for none.
    """

    def __init__(self, device: str | torch.device = "cpu", path: str | Path | None = None) -> None:
        import studio.world as world

        path = Path(path if path is not None else world.ORACLE_PATH)
        if not path.is_file():
            raise StudioError(f"The demo world's oracle is not built (no {path}); build it with python "
                              "scripts/build_world.py, or score with --scorer clip.")
        self.oracle = world.load_oracle(device, path)
        self.name = f"oracle:world:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"

    @staticmethod
    def targets(prompt: str) -> list[tuple[str, str]]:
        """``(attribute, value)`` pairs the prompt asks for, found by the world's own caption grammar."""
        from studio.world import VOCABULARY, describe

        found = []
        for value in VOCABULARY["background"]:
            phrase = describe(noun="X", prefix="", background=value).split("X ", 1)[1]
            if phrase in prompt:
                found.append(("background", value))
        found += [("size", value) for value in VOCABULARY["size"] if re.search(rf"\b{value}\b", prompt)]
        return found

    def judge(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[list[float], list[float | None]]:
        """Per image: (identity probability, editability or ``None``)."""
        from studio.world import VOCABULARY

        probs = self.oracle.read(list(images))  # head -> (N, n_values); identity -> (N,)
        fidelity = [float(v) for v in probs["identity"]]
        edits: list[float | None] = []
        for i, prompt in enumerate(prompts):
            asked = self.targets(prompt)
            hits = [int(probs[a][i].argmax()) == VOCABULARY[a].index(v) for a, v in asked]
            edits.append(sum(hits) / len(hits) if hits else None)
        return fidelity, edits


@dataclass
class Judges:
    """Loaded scoring models, reused across strengths and training steps (one embedding cache)."""

    kind: ScorerKind
    clip: Scorer | None = None
    dino: Scorer | None = None
    world: WorldJudge | None = None
    detector: Detector | None = None
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)

    def keys(self, fidelity: str | None = None) -> tuple[str, str]:
        """``(fidelity key, editability key)`` of this judge's reports."""
        if self.kind == "oracle":
            return "fidelity", "editability"
        key = fidelity or "clip_i"
        if key not in ("clip_i", "dino"):
            raise StudioError(f"fidelity must be clip_i or dino, got {key!r}.")
        if key == "dino" and self.dino is None:
            raise StudioError("fidelity=dino needs a DINO model (--dino-model facebook/dino-vits16).")
        return key, "clip_t"


def load_judges(scorer: ScorerKind | Scorer = "clip", *, clip_model: str = DEFAULT_CLIP, dino_model: str | None = None,
                detector: str | Detector | None = None, device: str | torch.device = "cpu",
                cache: EmbeddingCache | None = None) -> Judges:
    """Load the scoring models. ``scorer`` may be a :class:`~studio.evaluation.metrics.Scorer` instance (a
    CLIP-like judge injected by the caller); ``detector``: an OWL-ViT hub id or folder, ``"haar"``, or a callable."""
    cache = cache if cache is not None else EmbeddingCache()
    if scorer == "oracle":
        return Judges("oracle", world=WorldJudge(device), cache=cache)
    if isinstance(scorer, str) and scorer != "clip":
        raise StudioError(f"scorer must be 'clip' or 'oracle', got {scorer!r}.")
    clip = ClipScorer(clip_model, device=device) if isinstance(scorer, str) else scorer
    dino = DinoScorer(dino_model, device=device) if dino_model else None
    if isinstance(detector, str):
        from studio.evaluation.metrics import HaarCascadeDetector, OwlVitDetector

        detector = HaarCascadeDetector() if detector == "haar" else OwlVitDetector(detector, device=device)
    return Judges("clip", clip=clip, dino=dino, detector=detector, cache=cache)


def training_judges(eval_model: str | None, base: Any, scorer: Scorer | None = None) -> Judges:
    """Judges for ``--eval-every``: an injected scorer, the world oracle (``"oracle"``; the default where the
    base's profile judges with it) or a CLIP model (default :data:`~studio.evaluation.metrics.scorers.DEFAULT_CLIP`)."""
    if scorer is not None:
        return load_judges(scorer)
    model = eval_model or ("oracle" if base.profile.judge == "oracle" else DEFAULT_CLIP)
    if model == "oracle":
        return load_judges("oracle", device=getattr(base, "device", "cpu"))
    return load_judges("clip", clip_model=model, device=getattr(base, "device", "cpu"))


def score_images(images_by_prompt: Mapping[str, Sequence[Image.Image]], concepts: Sequence[EvalConcept],
                 judges: Judges, *, text_mode: TextMode = "class_noun") -> Report:
    """A :class:`~studio.evaluation.metrics.Report` of generated images (CLIP metrics, or the world oracle's)."""
    if judges.kind == "clip":
        assert judges.clip is not None  # set by load_judges
        return evaluate(images_by_prompt, list(concepts), judges.clip, identity_scorer=judges.dino,
                        detector=judges.detector if len(concepts) > 1 else None, text_mode=text_mode,
                        cache=judges.cache)
    # The oracle: records reuse the report's fields — clip_t holds editability, clip_i the identity probability.
    assert judges.world is not None
    flat = [(prompt, k, image) for prompt, group in images_by_prompt.items() for k, image in enumerate(group)]
    if not flat:
        raise StudioError("No generated images were given to evaluate.")
    fidelity, edits = judges.world.judge([im for _, _, im in flat], [p for p, _, _ in flat])
    label = concepts[0].label
    records = []
    for (prompt, k, _), fid, edit in zip(flat, fidelity, edits):
        asked = ", ".join(f"{a}={v}" for a, v in judges.world.targets(prompt))
        records.append(ImageRecord(prompt, k, asked, float("nan") if edit is None else edit, clip_i={label: fid}))
    name = judges.world.name
    summaries = {"fidelity": summarize("fidelity", fidelity, name)}
    asked_edits = [e for e in edits if e is not None]
    if asked_edits:
        summaries["editability"] = summarize("editability", asked_edits, name)
    settings = {
        "scorer": "oracle",
        "fields": {"clip_t": "oracle editability (share of asked attributes read)", "clip_t_text": "asked attributes",
                   "clip_i": "oracle probability of the world's concept"},
        "concepts": [{"name": c.label, "trigger": c.trigger, "class_noun": c.class_noun} for c in concepts],
        "images": len(flat), "prompts": len(images_by_prompt),
    }
    return Report(summaries, records, {"oracle": name}, settings)
