"""Measured quality for concepts: generate, score, report, and write the scores into the concept.

:func:`evaluate_concepts` runs one evaluation end to end; its options are one
:class:`EvaluateConfig` (:mod:`.config`: the ``evaluate`` CLI flags, the Evaluate tab and the Python
keywords all come from it; ``None`` = the loaded base's, from ``base.profile``):

1. prompts from a protocol (:func:`load_protocol`: ``dreambench-object``, ``dreambench-live``,
   ``world``; default: the base's) or a prompt file, ``{}`` standing for each concept as its method
   was trained (:func:`subject`: "a {} in the snow" → "a <my-dog> in the snow" for textual inversion,
   NeTI and Perfusion, "a <sks> dog in the snow" for DreamBooth); several concepts share every prompt
   ("a <a> and <b> dog in the snow") — :mod:`.protocols`;
2. the judges are loaded first, so a missing model fails before anything is generated
   (:mod:`.judges`): ``scorer="clip"`` — CLIP-T, CLIP-I (+ DINO with a ``dino_model``; CP-CLIP/TI-CLIP
   with a detector when several concepts are evaluated), :mod:`studio.evaluation.metrics`;
   ``scorer="oracle"`` — the demo world's oracle: *fidelity* = P(the image shows the world's concept),
   *editability* = whether the oracle reads the background/size the prompt asks for;
3. ``seeds`` images per prompt (image ``i`` uses seed ``seed + i``, as ``python -m studio generate
   --num-images``), generated in batches with the concepts applied once per strength setting
   (:mod:`.render`);
4. one :class:`~studio.evaluation.metrics.Report` — each image encoded once per backbone, shared by
   every metric (an :class:`~studio.evaluation.metrics.EmbeddingCache`) — with the time split between
   loading, generation and scoring in ``report.settings["timing"]``;
5. ``report.json``, ``contact_sheet.png``, ``scatter.png`` (fidelity against prompt fidelity) and the
   images in ``out_dir``; the summary goes into each concept file's ``studio.metrics["eval"]``
   (rewritten atomically) — :mod:`.evaluate`.

:func:`sweep_strength` (:mod:`.sweep`) does the same across strengths, plots the fidelity/editability
front and stores the recommended strength (``Concept.strength``). :class:`CurveTracker`
(:mod:`.curve`) scores a concept along training (``--eval-every``; driven by :mod:`trainers.runner`).

Reference photos (:mod:`.references`): a folder per concept (``references``), or the embeddings stored
in the concept file (``ref.clip``/``ref.dino``, :func:`attach_reference_embeddings`) when no folder is
given. The metrics themselves are defined in ``docs/metrics.md``.
"""

from studio.evaluation.config import EvaluateConfig
from studio.evaluation.curve import CurveTracker
from studio.evaluation.evaluate import evaluate_concepts, format_summary, summary
from studio.evaluation.judges import Judges, ScorerKind, WorldJudge, load_judges, score_images, training_judges
from studio.evaluation.protocols import (
    MULTI_PROMPTS,
    PROTOCOL_DIR,
    PROTOCOLS,
    TRAINING_PROMPTS,
    Protocol,
    build_prompts,
    load_protocol,
    read_prompt_file,
    subject,
    training_prompts,
)
from studio.evaluation.references import IMAGE_SUFFIXES, attach_reference_embeddings, load_reference_images
from studio.evaluation.render import live_text, render_batch, render_images
from studio.evaluation.sweep import SweepResult, sweep_strength

__all__ = [
    "IMAGE_SUFFIXES", "MULTI_PROMPTS", "PROTOCOLS", "PROTOCOL_DIR", "TRAINING_PROMPTS", "CurveTracker",
    "EvaluateConfig", "Judges", "Protocol", "ScorerKind", "SweepResult", "WorldJudge", "attach_reference_embeddings",
    "build_prompts", "evaluate_concepts", "format_summary", "live_text", "load_judges", "load_protocol",
    "load_reference_images", "read_prompt_file", "render_batch", "render_images", "score_images", "subject",
    "summary", "sweep_strength", "training_judges", "training_prompts",
]
