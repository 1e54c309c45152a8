"""Choosing a strength (fidelity/editability sweep) or a checkpoint (eval curve) from scores.

Inputs are :class:`TradeoffPoint` s: a value (a strength, or a training step) with a *fidelity*
score (CLIP-I or DINO: does it look like the subject?) and an *editability* score (CLIP-T: does it
follow the prompt?). Raising a concept's strength, or training longer, usually trades the second
for the first.

Rules (pure functions, no models):

- **Pareto front**: the points no other point beats on both scores (>= on both, > on one).
- ``rule="product"`` (default): min-max normalise each score over all points
  (``f^ = (f - f_min) / (f_max - f_min)``; a constant score normalises to 1), and pick the front
  point maximising ``f^ * e^``. The extremes of the sweep score 0 on one factor, so the choice is
  an interior compromise whenever the front has one.
- ``rule="knee"``: on the normalised front, the point farthest above the chord joining the
  front's two extremes (the "knee" of the trade-off curve); falls back to ``"product"`` with fewer
  than three front points.
- ``rule="fidelity"`` (checkpoints): the highest fidelity, ignoring editability.

Ties go to the higher fidelity, then to the smaller value (a lower strength / an earlier step).
``min_editability`` first drops points whose editability is below it (e.g. "no worse than the base
model's CLIP-T minus 0.02").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from studio.errors import StudioError

Rule = Literal["product", "knee", "fidelity"]


@dataclass(frozen=True)
class TradeoffPoint:
    """One evaluated setting: ``value`` (strength or step) with its fidelity and editability."""

    value: float
    fidelity: float
    editability: float


@dataclass(frozen=True)
class Choice:
    """The chosen point and why."""

    value: float  # the recommended strength / best step
    index: int  # its index in the input points
    fidelity: float
    editability: float
    front: tuple[int, ...]  # indices of the Pareto front (among the eligible points), by value
    rule: str  # a sentence stating the rule applied

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "value": self.value,
            "index": self.index,
            "fidelity": self.fidelity,
            "editability": self.editability,
            "front": list(self.front),
            "rule": self.rule,
        }


def _check(points: Sequence[TradeoffPoint]) -> None:
    if not points:
        raise StudioError("No evaluated points were given to choose from.")
    for point in points:
        if not (math.isfinite(point.fidelity) and math.isfinite(point.editability)):
            raise StudioError(f"Scores must be finite numbers, got {point} .")


def pareto_front(points: Sequence[TradeoffPoint]) -> list[int]:
    """Indices of the points not dominated on (fidelity, editability), sorted by value."""
    _check(points)
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q.fidelity >= p.fidelity
            and q.editability >= p.editability
            and (q.fidelity > p.fidelity or q.editability > p.editability)
            for q in points
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i].value, i))


def _normaliser(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return low, (high - low)


def _norm(x: float, low: float, span: float) -> float:
    return 1.0 if span <= 0 else (x - low) / span


def _best(candidates: Sequence[int], objective: Mapping[int, float], points: Sequence[TradeoffPoint]) -> int:
    # Highest objective; ties: higher fidelity, then smaller value, then earlier index.
    return max(candidates, key=lambda i: (round(objective[i], 12), points[i].fidelity, -points[i].value, -i))


def _choose(points: Sequence[TradeoffPoint], rule: Rule, min_editability: float | None) -> Choice:
    _check(points)
    eligible = list(range(len(points)))
    if min_editability is not None:
        eligible = [i for i in eligible if points[i].editability >= min_editability]
        if not eligible:
            best = max(p.editability for p in points)
            raise StudioError(
                f"No point keeps editability >= {min_editability:.4f} (the best is {best:.4f}); lower the floor."
            )
    subset = [points[i] for i in eligible]
    front = [eligible[k] for k in pareto_front(subset)]
    f_low, f_span = _normaliser([p.fidelity for p in subset])
    e_low, e_span = _normaliser([p.editability for p in subset])
    fn = {i: _norm(points[i].fidelity, f_low, f_span) for i in eligible}
    en = {i: _norm(points[i].editability, e_low, e_span) for i in eligible}

    if rule == "fidelity":
        chosen = _best(eligible, {i: points[i].fidelity for i in eligible}, points)
        text = "highest fidelity"
    elif rule == "knee" and len(front) >= 3:
        ends = sorted(front, key=lambda i: (fn[i], -en[i]))
        a, b = ends[0], ends[-1]  # max editability end, max fidelity end
        dx, dy = fn[b] - fn[a], en[b] - en[a]
        length = math.hypot(dx, dy) or 1.0
        # Signed distance from the chord, positive on the side of (1, 1).
        distance = {i: (dx * (en[i] - en[a]) - dy * (fn[i] - fn[a])) / length for i in front}
        chosen = _best(front, distance, points)
        text = "Pareto point farthest above the chord between the front's extremes (knee), min-max normalised"
    elif rule in ("product", "knee"):
        chosen = _best(front, {i: fn[i] * en[i] for i in front}, points)
        text = "Pareto point maximising min-max normalised fidelity x editability"
    else:
        raise StudioError(f"Unknown selection rule {rule!r}; use 'product', 'knee' or 'fidelity'.")
    if min_editability is not None:
        text += f", among points with editability >= {min_editability:.4f}"
    point = points[chosen]
    return Choice(point.value, chosen, point.fidelity, point.editability, tuple(front), text)


def recommend_strength(
    points: Sequence[TradeoffPoint], *, rule: Rule = "product", min_editability: float | None = None
) -> Choice:
    """The recommended strength of a fidelity/editability sweep (module docstring for the rules)."""
    return _choose(points, rule, min_editability)


def best_checkpoint(
    points: Sequence[TradeoffPoint], *, rule: Rule = "product", min_editability: float | None = None
) -> Choice:
    """The best checkpoint of an eval curve (``value`` = training step).

    ``rule="product"`` balances fidelity against editability like :func:`recommend_strength`;
    ``rule="fidelity"`` takes the highest fidelity. Ties go to the earlier step.
    """
    return _choose(points, rule, min_editability)


class _HasMean(Protocol):
    @property
    def mean(self) -> float: ...


class _HasSummaries(Protocol):  # e.g. a Report (read-only: its dict[str, MetricSummary] matches)
    @property
    def summaries(self) -> Mapping[str, _HasMean]: ...


def points_from_reports(
    values: Sequence[float],
    reports: Sequence[_HasSummaries],
    *,
    fidelity: str = "clip_i",
    editability: str = "clip_t",
) -> list[TradeoffPoint]:
    """One :class:`TradeoffPoint` per report: ``value`` with the two summaries' means."""
    if len(values) != len(reports):
        raise StudioError(f"Got {len(values)} values for {len(reports)} reports; give one per report.")
    points = []
    for value, report in zip(values, reports):
        for key in (fidelity, editability):
            if key not in report.summaries:
                raise StudioError(f"A report has no '{key}' score; it has {sorted(report.summaries)}.")
        points.append(
            TradeoffPoint(
                float(value),
                float(report.summaries[fidelity].mean),
                float(report.summaries[editability].mean),
            )
        )
    return points
