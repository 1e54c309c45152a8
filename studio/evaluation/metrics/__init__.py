"""Personalization metrics: CLIP-T, CLIP-I, DINO, CP-CLIP and TI-CLIP (definitions: docs/metrics.md).

Table of contents:

- :mod:`~studio.evaluation.metrics.formulas` — the metrics as pure functions of embeddings;
- :mod:`~studio.evaluation.metrics.texts` — which text CLIP-T and TI-CLIP score;
- :mod:`~studio.evaluation.metrics.scorers` — the :class:`Scorer` interface and its backends (transformers
  CLIP, DINO CLS, open_clip, an oracle adapter);
- :mod:`~studio.evaluation.metrics.cache` — the embedding cache;
- :mod:`~studio.evaluation.metrics.detectors` — the :class:`Detector` interface (OWL-ViT, Haar cascades);
- :mod:`~studio.evaluation.metrics.multiconcept` — CP-CLIP on one image (detect, crop, score);
- :mod:`~studio.evaluation.metrics.evaluate` — :func:`evaluate` images already generated into a :class:`Report`;
- :mod:`~studio.evaluation.metrics.selection` — Pareto front, recommended strength, best checkpoint;
- :mod:`~studio.evaluation.metrics.report` — ``report.json``, contact sheet, scatter plot.

Importing this package loads no model and imports neither OpenCV nor matplotlib.
"""

from studio.evaluation.metrics.cache import CachedScorer, EmbeddingCache, image_key, text_key
from studio.evaluation.metrics.detectors import (
    HAAR_LABELS,
    Detections,
    Detector,
    HaarCascadeDetector,
    OwlVitDetector,
    best_box_per_label,
    crop_box,
)
from studio.evaluation.metrics.evaluate import EvalConcept, evaluate
from studio.evaluation.metrics.formulas import (
    CPClipScore,
    MetricSummary,
    Scores,
    clip_i,
    clip_t,
    cp_clip,
    dino,
    matched_cosine,
    pairwise_cosine,
    ti_clip,
)
from studio.evaluation.metrics.multiconcept import CPClipImage, cp_clip_image
from studio.evaluation.metrics.report import (
    ImageRecord,
    Report,
    contact_sheet,
    plot_report,
    plot_sweep,
    scatter_plot,
    write_report,
)
from studio.evaluation.metrics.scorers import ClipScorer, DinoScorer, OpenClipScorer, OracleScorer, Scorer
from studio.evaluation.metrics.selection import (
    Choice,
    TradeoffPoint,
    best_checkpoint,
    pareto_front,
    points_from_reports,
    recommend_strength,
)
from studio.evaluation.metrics.texts import TextMode, clip_t_text, context_text

__all__ = [
    "HAAR_LABELS",
    "CPClipImage",
    "CPClipScore",
    "CachedScorer",
    "Choice",
    "ClipScorer",
    "Detections",
    "Detector",
    "DinoScorer",
    "EmbeddingCache",
    "EvalConcept",
    "HaarCascadeDetector",
    "ImageRecord",
    "MetricSummary",
    "OpenClipScorer",
    "OracleScorer",
    "OwlVitDetector",
    "Report",
    "Scorer",
    "Scores",
    "TextMode",
    "TradeoffPoint",
    "best_box_per_label",
    "best_checkpoint",
    "clip_i",
    "clip_t",
    "clip_t_text",
    "contact_sheet",
    "context_text",
    "cp_clip",
    "cp_clip_image",
    "crop_box",
    "dino",
    "evaluate",
    "image_key",
    "matched_cosine",
    "pairwise_cosine",
    "pareto_front",
    "plot_report",
    "plot_sweep",
    "points_from_reports",
    "recommend_strength",
    "scatter_plot",
    "text_key",
    "ti_clip",
    "write_report",
]
