"""A strength sweep: one concept evaluated at several strengths, its fidelity/editability front and the
recommended strength, stored in the concept (``Concept.strength``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from studio.concept import Concept
from studio.errors import StudioError
from studio.evaluation.config import EvaluateConfig
from studio.evaluation.evaluate import once, prepare, record, split_options, summary
from studio.evaluation.judges import Judges
from studio.evaluation.metrics import Choice, Report, TradeoffPoint, plot_sweep, points_from_reports, recommend_strength
from studio.generation import ConceptUse


@dataclass
class SweepResult:
    """A strength sweep: one report per strength, the points, the recommended strength."""

    strengths: list[float]
    reports: list[Report]
    points: list[TradeoffPoint]
    choice: Choice
    fidelity: str
    editability: str
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """What goes into ``sweep.json`` and the concept's ``studio.metrics["sweep"]``."""
        return {
            "fidelity": self.fidelity, "editability": self.editability,
            "points": [{"strength": p.value, "fidelity": p.fidelity, "editability": p.editability,
                        "scores": {k: v.mean for k, v in r.summaries.items() if math.isfinite(v.mean)}}
                       for p, r in zip(self.points, self.reports)],
            "front": [self.points[i].value for i in self.choice.front],
            "recommended": self.choice.value, "rule": self.choice.rule,
            "backbones": dict(self.reports[0].backbones) if self.reports else {},
        }


def sweep_strength(target: Any, concept: str | ConceptUse | Concept, strengths: Sequence[float] | None = None,
                   config: EvaluateConfig | None = None, *, rule: Literal["product", "knee"] = "product",
                   min_editability: float | None = None, references: Any = None, judges: Judges | None = None,
                   **options: Any) -> SweepResult:
    """Evaluate one concept at each strength (same prompts and seeds), choose the recommended strength
    (:func:`~studio.evaluation.metrics.recommend_strength`) and store it in the concept (``Concept.strength``,
    ``studio.metrics["sweep"]``, and ``["eval"]`` at the chosen strength). ``strengths`` default to the
    config's ``sweep``; ``config`` / ``options`` / ``references`` / ``judges`` are
    :func:`~studio.evaluation.evaluate_concepts`' (prompts, protocol, seeds, scorer …). Writes
    ``strength-<s>/`` (``report.json``, ``contact_sheet.png``), ``sweep.json`` and ``sweep.png`` (the
    fidelity/editability front) to ``out_dir``."""
    cfg, injected = split_options(config, options)
    given = list(strengths) if strengths is not None else (cfg.strengths() or [])
    values = sorted({float(s) for s in given})
    if len(values) < 2:
        raise StudioError(f"A sweep needs at least two different strengths, got {given}.")
    for s in values:
        if not 0.0 <= s <= 2.0:
            raise StudioError(f"Sweep strengths must be between 0 and 2, got {s}.")
    if isinstance(concept, ConceptUse) and concept.stages is not None and concept.stages.values is not None:
        raise StudioError(f"{concept.source}: a sweep varies one strength, and one strength per stage fixes them "
                          "all; select the stages the sweep drives with @, e.g. FILE@0-4.")
    run = prepare(target, [concept], cfg, references=references, judges=judges, **injected)
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else None
    reports = []
    for s in values:
        report, _ = once(run, [s], out / f"strength-{s:g}" if out else None, plot=False)
        reports.append(report)
    points = points_from_reports(values, reports, fidelity=run.fidelity, editability=run.editability)
    choice = recommend_strength(points, rule=rule, min_editability=min_editability)
    result = SweepResult(values, reports, points, choice, run.fidelity, run.editability)
    if out is not None:
        result.paths["sweep"] = out / "sweep.json"
        result.paths["sweep"].write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        result.paths["plot"] = plot_sweep(points, choice, out / "sweep.png")
    if cfg.write_back:
        chosen = summary(reports[choice.index])

        def update(c: Concept, item: Any) -> None:
            c.strength = choice.value
            c.metrics = dict(c.metrics) | {"sweep": result.to_dict(), "eval": chosen | {"source": item.source}}

        record(run, update)
    return result
