"""The training curve: a concept scored along training (``--eval-every``, driven by
:class:`trainers.runner.TrainingEvaluator`), and the best checkpoint among the evaluated steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from PIL import Image

from studio.concept import Concept
from studio.evaluation.judges import Judges, score_images
from studio.evaluation.metrics import (
    Choice,
    EvalConcept,
    TradeoffPoint,
    best_checkpoint,
    pareto_front,
    points_from_reports,
)


class CurveTracker:
    """Scores of one concept along training (``--eval-every``) and the best checkpoint.

    :meth:`add` scores the images of one evaluation; the concept exported at that step is kept while
    its point is on the Pareto front (a dominated point never becomes the best again), so memory stays
    small. :meth:`best` applies :func:`~studio.evaluation.metrics.best_checkpoint` (``rule``) to all points.
    """

    def __init__(self, judges: Judges, concept: EvalConcept, *, prompts: Sequence[str], images_per_prompt: int,
                 steps: int, fidelity: str | None = None, rule: Literal["product", "fidelity"] = "product") -> None:
        self.judges, self.concept, self.rule = judges, concept, rule
        self.fidelity, self.editability = judges.keys(fidelity)
        self.settings = {"prompts": list(prompts), "images_per_prompt": images_per_prompt, "sampler_steps": steps}
        self.points: list[TradeoffPoint] = []
        self.scores: list[dict[str, float]] = []
        self.concepts: dict[float, Concept] = {}

    def add(self, step: int, images_by_prompt: Mapping[str, Sequence[Image.Image]], concept: Concept) -> TradeoffPoint:
        """Score one evaluation and keep ``concept`` if it is on the front."""
        report = score_images(images_by_prompt, [self.concept], self.judges)
        point = points_from_reports([step], [report], fidelity=self.fidelity, editability=self.editability)[0]
        self.points.append(point)
        self.scores.append({k: v.mean for k, v in report.summaries.items() if math.isfinite(v.mean)})
        self.concepts[float(step)] = concept
        keep = {self.points[i].value for i in pareto_front(self.points)} | {self.best().value}
        self.concepts = {v: c for v, c in self.concepts.items() if v in keep}
        return point

    def best(self) -> Choice:
        """The best checkpoint so far."""
        return best_checkpoint(self.points, rule=self.rule)

    def best_concept(self) -> Concept:
        """The concept exported at the best step."""
        return self.concepts[self.best().value]

    def to_metrics(self) -> dict[str, Any]:
        """``studio.metrics["curve"]``: every point with its scores, and the best step."""
        choice = self.best()
        return {
            "fidelity": self.fidelity, "editability": self.editability, "rule": choice.rule,
            "backbones": {"clip": self.judges.clip.name} if self.judges.clip is not None else
            {"oracle": self.judges.world.name if self.judges.world else ""},
            "points": [{"step": int(p.value), "fidelity": p.fidelity, "editability": p.editability, "scores": s}
                       for p, s in zip(self.points, self.scores)],
            "best_step": int(choice.value),
            **self.settings,
        }
