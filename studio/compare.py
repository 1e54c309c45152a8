"""A/B comparison: concepts (or one concept at several strengths, or the base alone) rendered with the
same prompts and seeds, side by side, each column scored by the evaluation's judges.

>>> arms = arms_for_strengths("my-dog", [0, 0.5, 1], baseline=True)
>>> result = compare(studio, arms, seeds=2, steps=20)
>>> result.image.save("compare.png")              # columns = arms, rows = prompt × seed, scores below
>>> for row in result.table(): print(row)         # arm, concepts, one mean per metric

An :class:`Arm` is one column: a label and the concepts applied together (a
:class:`~studio.generation.ConceptUse` with its strength, a file or library name, or an in-memory
:class:`~studio.concept.Concept`); an arm with no concept is the base alone — a baseline column.

What :func:`compare` does, reusing :mod:`studio.evaluation`:

1. one list of prompt *templates* for every arm: the config's prompts, else its protocol, else the
   base's (``{}`` = each arm's subject as its method was trained — ``"a photo of <my-dog>"`` —, the
   class noun for the base alone — ``"a photo of dog"``); the same seeds (image ``i`` of a prompt uses
   ``seed + i``) in every column;
2. the judges loaded once (:func:`~studio.evaluation.load_judges`; the oracle on the demo world, else
   CLIP) and shared by every arm (one embedding cache);
3. per arm, :func:`studio.evaluation.evaluate.prepare` and :func:`~studio.evaluation.evaluate.once` —
   the evaluation's own generation and scoring, one :class:`~studio.evaluation.metrics.Report` per arm.
   The base-alone column is scored against the first arm's first concept (its references, or the
   oracle's concept);
4. the labelled side-by-side image (:func:`studio.grid.assemble`: small images enlarged with
   nearest-neighbour to :data:`~studio.grid.MIN_CELL`, large ones reduced to :data:`MAX_CELL`) with each
   column's fidelity and editability written under it.

Nothing is written into the concept files (an evaluation's ``write_back`` is ignored here). With
``out_dir``: ``compare.png``, ``compare.json`` (the scores per arm, their reports) and, with
``save_images``, ``images/<arm>/p<prompt>-s<seed>.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from PIL import Image, ImageDraw

from studio.concept import Concept
from studio.errors import StudioError
from studio.evaluation.config import EvaluateConfig
from studio.evaluation.evaluate import Run, once, prepare, split_options
from studio.evaluation.judges import DEFAULT_DETECTOR, Judges, ScorerKind, load_judges
from studio.evaluation.metrics import Report
from studio.evaluation.protocols import MULTI_PROMPTS, build_prompts, load_protocol, read_prompt_file
from studio.generation import ConceptUse, png_info
from studio.grid import MAX_CELLS, MIN_CELL, _font, _text_width, assemble
from studio.methods import load_concept
from studio.prompts import check_strength

MAX_ARMS = 8
MAX_CELL = 256  # larger images are reduced to this side in the side-by-side image (scores use the originals)
GRID_PAD = 6  # studio.grid.assemble's gap between cells and its top band for the column labels
GRID_TOP = 24
FOOTER_LINE = 18  # one line of scores under the columns
BASE_LABEL = "base"
METRIC_NAMES = {"fidelity": "fidelity", "editability": "editab.", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
                "dino": "DINO", "cp_clip": "CP-CLIP", "ti_clip": "TI-CLIP"}

ConceptEntry = ConceptUse | Concept | str


@dataclass
class Arm:
    """One column of a comparison: a label and the concepts applied together.

    ``concepts``: :class:`~studio.generation.ConceptUse` (a file or library name with an optional
    strength), a file / library name, or an in-memory :class:`~studio.concept.Concept` (its
    ``strength`` is used). An empty list is the base alone (the baseline column)."""

    label: str
    concepts: list[ConceptEntry] = field(default_factory=list)

    @property
    def is_base(self) -> bool:
        """True for the base-alone column."""
        return not self.concepts


def concept_label(entry: ConceptEntry) -> str:
    """A short name for a concept entry: the library name or file stem (``dogs/kit.safetensors`` →
    ``kit``), the in-memory concept's name, with its per-stage strengths as written (``kit@0-4``,
    ``kit:1,1,0.5,…``) and ``:strength`` when one is given (``kit@0-4:0.8``)."""
    stages = None
    if isinstance(entry, Concept):
        name, strength = entry.name or entry.trigger.strip("<>"), entry.strength
    else:
        use = entry if isinstance(entry, ConceptUse) else ConceptUse(str(entry))
        source = use.source.rstrip("/\\")
        name = Path(source).stem if source.endswith(".safetensors") else Path(source).name or source
        strength, stages = use.strength, use.stages
    if stages is not None:
        name += str(stages)
        if stages.values is not None:  # one strength per stage: they are the strengths
            return name
    return name if strength is None else f"{name}:{strength:g}"


def parse_strengths(text: str | Sequence[float]) -> list[float]:
    """``"0, 0.5, 1"`` (or a list) → ``[0.0, 0.5, 1.0]``: each checked (0 ≤ s ≤ the studio's maximum),
    duplicates dropped, the order kept."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(v) for v in text]
    values: list[float] = []
    for p in parts:
        if not p:
            continue
        try:
            value = check_strength(float(p), where="--strengths")
        except ValueError:
            raise StudioError(f"Strengths are numbers separated by commas, e.g. 0, 0.5, 1; got {text!r}.") from None
        if value not in values:
            values.append(value)
    if not values:
        raise StudioError("Give at least one strength, e.g. 0, 0.5, 1.")
    return values


def arms_for_concepts(concepts: Sequence[ConceptEntry], *, baseline: bool = False) -> list[Arm]:
    """One arm per concept (``"a.safetensors"``, ``ConceptUse("b", 0.8)`` …), labelled by
    :func:`concept_label`; ``baseline`` puts the base alone first."""
    arms = [Arm(BASE_LABEL)] if baseline else []
    return arms + [Arm(concept_label(c), [c]) for c in concepts]


def arms_for_strengths(concept: ConceptEntry, strengths: str | Sequence[float], *,
                       baseline: bool = False) -> list[Arm]:
    """One arm per strength of one concept (labels ``kit:0``, ``kit:0.5`` …); ``baseline`` puts the
    base alone first. ``strengths``: numbers or the text ``"0, 0.5, 1"`` (:func:`parse_strengths`)."""
    values = parse_strengths(strengths)
    stages = concept.stages if isinstance(concept, ConceptUse) else None
    if stages is not None and stages.values is not None:
        raise StudioError(f"{concept_label(concept)}: one strength per stage leaves nothing for --strengths to vary; "
                          "select the stages it drives with @, e.g. FILE@0-4.")
    arms = [Arm(BASE_LABEL)] if baseline else []
    for s in values:
        if isinstance(concept, Concept):
            entry: ConceptEntry = dataclasses.replace(concept, strength=s)
        else:
            entry = ConceptUse(concept.source if isinstance(concept, ConceptUse) else str(concept), s, stages)
        arms.append(Arm(concept_label(entry), [entry]))
    return arms


@dataclass
class ArmResult:
    """One arm's images and scores.

    ``prompts``: template → the prompt as written for this arm; ``images``: template → one
    ``(H, W)`` RGB image per seed (image ``i`` made with seed ``seed + i``), as the base renders them
    (32 × 32 on the demo world, 512 × 512 on Stable Diffusion 1.5); ``report``: the evaluation's
    :class:`~studio.evaluation.metrics.Report` of all of them."""

    arm: Arm
    report: Report
    prompts: dict[str, str]
    images: dict[str, list[Image.Image]]

    @property
    def label(self) -> str:
        return self.arm.label

    def scores(self) -> dict[str, float]:
        """Metric → mean over the arm's images (``fidelity``/``editability`` with the oracle; ``clip_t``,
        ``clip_i``, ``dino`` … with CLIP); metrics that could not be computed are left out."""
        return {k: float(v.mean) for k, v in self.report.summaries.items() if math.isfinite(v.mean)}

    def concepts_text(self) -> str:
        """The concepts applied and their effective strengths (``kit:0.5, hat:1``; per-stage strengths after
        ``@``, stage 0 the noisiest: ``kit:1@1,1,0,…``), or "base alone"."""
        strengths = self.report.settings.get("strengths") or {}
        stages = self.report.settings.get("stages") or {}
        if self.arm.is_base or not strengths:
            return "base alone"
        return ", ".join(f"{name}:{float(s):g}" + ("@" + ",".join(f"{float(v):g}" for v in stages[name])
                                                  if name in stages else "")
                         for name, s in strengths.items())


@dataclass
class Comparison:
    """The result of :func:`compare`.

    ``arms``: one :class:`ArmResult` per column, in the order given; ``templates`` and ``seeds``
    (the seed numbers, ``seed + i``) are every arm's; ``image``: the labelled side-by-side RGB image —
    columns = arms, rows = ``grid_rows`` ((template, seed index) pairs; every image when they fit in
    :data:`~studio.grid.MAX_CELLS` cells, else the first seeds of each prompt), the scores of each
    column under it; ``fidelity``/``editability``: the judge's keys of those two scores."""

    arms: list[ArmResult]
    templates: list[str]
    seeds: list[int]
    image: Image.Image
    grid_rows: list[tuple[str, int]]
    fidelity: str
    editability: str
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    def arm(self, key: int | str) -> ArmResult:
        """An arm by position or label."""
        if isinstance(key, int):
            return self.arms[key]
        for result in self.arms:
            if result.label == key:
                return result
        raise StudioError(f"No arm {key!r}; the arms are {', '.join(r.label for r in self.arms)}.")

    def image_of(self, arm: int | str, template: str, seed_index: int) -> Image.Image:
        """The image of one arm for one prompt template and seed index (seed ``seeds[seed_index]``)."""
        return self.arm(arm).images[template][seed_index]

    def metrics(self) -> list[str]:
        """The scores the arms have: fidelity, editability, then the others in report order."""
        found: list[str] = []
        for result in self.arms:
            found += [k for k in result.scores() if k not in found]
        lead = [k for k in (self.fidelity, self.editability) if k in found]
        return lead + [k for k in found if k not in lead]

    def columns(self) -> list[str]:
        """The headers of :meth:`table`."""
        return ["arm", "concepts", *self.metrics()]

    def table(self) -> list[list[Any]]:
        """One row per arm: label, concepts with strengths, then each metric's mean (4 decimals;
        ``None`` where an arm has no such score)."""
        metrics = self.metrics()
        rows = []
        for result in self.arms:
            scores = result.scores()
            rows.append([result.label, result.concepts_text(),
                         *(round(scores[m], 4) if m in scores else None for m in metrics)])
        return rows

    def format_table(self) -> str:
        """:meth:`table` as aligned text (the CLI prints it)."""
        cells = [self.columns()] + [[("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
                                     for v in row] for row in self.table()]
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)

    def to_dict(self) -> dict[str, Any]:
        """What goes into ``compare.json``: settings, templates, seeds, and per arm its label, concepts,
        prompts, scores and full report."""
        return {
            "settings": dict(self.settings), "templates": list(self.templates), "seeds": list(self.seeds),
            "fidelity": self.fidelity, "editability": self.editability, "columns": self.columns(),
            "table": self.table(), "notes": list(self.notes),
            "grid_rows": [{"template": t, "seed": self.seeds[i]} for t, i in self.grid_rows],
            "arms": [{"label": r.label, "concepts": r.concepts_text(), "prompts": dict(r.prompts),
                      "scores": r.scores(), "report": r.report.to_dict()} for r in self.arms],
        }

    def save(self, out_dir: str | Path, *, images: bool = True) -> dict[str, Path]:
        """Write ``compare.png`` (with its PNG texts), ``compare.json`` and, with ``images``, each arm's
        images as ``images/<k>-<label>/p<prompt>-s<seed>.png``. Returns (and keeps in :attr:`paths`) the
        files' paths by kind."""
        from studio.atomic import atomic_path

        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "compare.png") as tmp:
            self.image.save(tmp, format="PNG", pnginfo=png_info(self.image))
        self.paths["image"] = out / "compare.png"
        data = json.dumps(_json_safe(self.to_dict()), indent=2)
        with atomic_path(out / "compare.json") as tmp:
            Path(tmp).write_text(data, encoding="utf-8")
        self.paths["json"] = out / "compare.json"
        if images:
            for k, result in enumerate(self.arms):
                folder = out / "images" / f"{k:02d}-{_slug(result.label)}"
                folder.mkdir(parents=True, exist_ok=True)
                for p, template in enumerate(self.templates):
                    for i, image in enumerate(result.images[template]):
                        image.save(folder / f"p{p:02d}-s{self.seeds[i]}.png", format="PNG", pnginfo=png_info(image))
            self.paths["images"] = out / "images"
        return dict(self.paths)


def compare(target: Any, arms: Sequence[Arm], config: EvaluateConfig | None = None, *, judges: Judges | None = None,
            references: Any = None, max_cells: int = MAX_CELLS, **options: Any) -> Comparison:
    """Render every arm with the same prompt templates and seeds, score each with the same judges and
    lay the images side by side (the module docstring has the steps).

    Args:
        target: a :class:`~studio.service.Studio` (concepts by file or library name) or a loaded
            :class:`~studio.models.BaseModel` (concept files).
        arms: the columns, in order (:func:`arms_for_concepts`, :func:`arms_for_strengths`); at least
            one with a concept, at most :data:`MAX_ARMS`; labels must differ.
        config: the evaluation options (:class:`~studio.evaluation.EvaluateConfig`: prompts or protocol,
            seeds — images per prompt —, seed, steps, guidance, scorer, CLIP/DINO models …; ``None``
            fields follow the base). ``write_back``, ``sweep`` and ``store_refs`` do not apply here.
        judges: already loaded judges (:func:`~studio.evaluation.load_judges`) to reuse across calls.
        references: reference photos for CLIP-I/DINO: one folder for every arm (the same subject), or
            one entry per arm with concepts (a folder, or a list per concept); ``None``: the embeddings
            stored in each concept.
        max_cells: the most images the side-by-side image holds (every image is scored regardless).
        options: :class:`~studio.evaluation.EvaluateConfig` fields overriding ``config`` (``seeds=2,
            steps=20, out_dir=...``); ``scorer`` / ``detector`` may be a Scorer / Detector instance.

    Returns:
        A :class:`Comparison`: one :class:`ArmResult` (report, images per template and seed) per arm,
        the side-by-side image — a ``(left + A·(c + 6) + 6) × (24 + R·(c + 6) + 6 + footer)`` RGB sheet
        for ``A`` arms, ``R`` rows and ``c``-pixel cells —, :meth:`Comparison.table` rows for display;
        with ``out_dir`` its files are written (:meth:`Comparison.save`).
    """
    t0 = time.monotonic()
    cfg, injected = split_options(config, options)
    arms = _check_arms(arms)
    studio = target if hasattr(target, "library") and hasattr(target, "load_concept") else None
    base = studio.base if studio is not None else target
    concept_arms = [a for a in arms if not a.is_base]
    # 1. one list of templates for every arm; the reference concepts name the base-alone column's subject.
    reference = [_load(studio, entry) for entry in concept_arms[0].concepts]
    most = max(len(a.concepts) for a in concept_arms)
    resolved = cfg.for_base(base.profile, concepts=most)
    templates, protocol, per_prompt = _templates(cfg, resolved, reference[0])
    seeds = cfg.seeds or per_prompt
    if not 1 <= seeds <= 64:
        raise StudioError(f"seeds (images per prompt) must be between 1 and 64, got {seeds}.")
    # 2. the judges, once, before anything is generated.
    judges = judges or load_judges(
        injected["scorer"] if "scorer" in injected else cast(ScorerKind, resolved.scorer),
        clip_model=resolved.clip_model, dino_model=resolved.dino_model,
        detector=injected.get("detector") or resolved.detector or (DEFAULT_DETECTOR if most > 1 else None),
        device=getattr(base, "device", "cpu"))
    arm_cfg = dataclasses.replace(resolved, prompts=templates, protocol=None, seeds=seeds, out_dir=None,
                                  write_back=False, sweep=None, store_refs=False)
    refs = _references(references, concept_arms)
    # 3. every arm with concepts through the evaluation's prepare/once; then the base alone.
    results: dict[int, ArmResult] = {}
    runs: list[Run] = []
    notes: list[str] = []
    for k, arm in enumerate(arms):
        if arm.is_base:
            continue
        run = prepare(target, arm.concepts, arm_cfg, references=refs[len(runs)], judges=judges)
        runs.append(run)
        concepts = [item.concept for item in run.items]
        prompts = {t: build_prompts([t], concepts)[0] for t in templates}
        report, images = once(run, [None] * len(run.items), None, plot=False)
        report.settings["protocol"] = protocol
        results[k] = ArmResult(arm, report, prompts, {t: images[p] for t, p in prompts.items()})
        notes += [n for n in run.notes if n not in notes]
    first = runs[0]
    for k, arm in enumerate(arms):
        if not arm.is_base:
            continue
        prompts = {t: _base_prompt(t, [item.concept for item in first.items]) for t in templates}
        run = Run(first.base, [], list(dict.fromkeys(prompts.values())), protocol, judges,
                  first.eval_concepts[:1], arm_cfg, seeds, first.fidelity, first.editability, 0.0)
        report, images = once(run, [], None, plot=False)
        report.settings["protocol"] = protocol
        results[k] = ArmResult(arm, report, prompts, {t: images[p] for t, p in prompts.items()})
    ordered = [results[k] for k in range(len(arms))]
    # 4. the side-by-side image.
    rows = _grid_rows(templates, seeds, len(arms), max_cells)
    if len(rows) < len(templates) * seeds:
        notes.append(f"The image shows {len(rows)} of the {len(templates) * seeds} prompt × seed rows (at most "
                     f"{max_cells} images); every image is scored and saved.")
    seed_numbers = [cfg.seed + i for i in range(seeds)]
    settings = {"protocol": protocol, "seeds": seeds, "seed": cfg.seed, "steps": arm_cfg.steps,
                "guidance": arm_cfg.guidance, "scorer": judges.kind, "base": getattr(base, "name", ""),
                "base_identity": getattr(base, "identity", ""), "arms": [a.label for a in arms],
                "backbones": dict(ordered[0].report.backbones)}
    image = side_by_side(ordered, rows, seed_numbers, (first.fidelity, first.editability))
    image.info["parameters"] = _parameters(ordered, settings)
    image.info["studio"] = json.dumps(_json_safe({"compare": settings | {
        "templates": templates, "seed_numbers": seed_numbers,
        "scores": {r.label: r.scores() for r in ordered}}}))
    settings["timing"] = {"total_s": round(time.monotonic() - t0, 3),
                          "images": sum(len(v) for r in ordered for v in r.images.values())}
    result = Comparison(ordered, templates, seed_numbers, image, rows, first.fidelity, first.editability,
                        settings, notes)
    if cfg.out_dir:
        result.save(cfg.out_dir, images=cfg.save_images)
    return result


def side_by_side(arms: Sequence[ArmResult], rows: Sequence[tuple[str, int]], seed_numbers: Sequence[int],
                 metrics: Sequence[str] = ()) -> Image.Image:
    """The labelled sheet: one column per arm (its label on top, its ``metrics`` means under it), one
    row per ``(template, seed index)``. Cells are the arms' ``(H, W)`` images: enlarged with
    nearest-neighbour to at least :data:`~studio.grid.MIN_CELL` pixels (:func:`studio.grid.assemble`),
    reduced to :data:`MAX_CELL` when larger. Size: ``(left + A·(c + 6) + 6) ×
    (24 + R·(c + 6) + 6 + footer)`` for ``A`` arms, ``R`` rows, ``c``-pixel cells and a footer of
    ``FOOTER_LINE`` per shown metric (+ 6)."""
    cells = [[_cell(a.images[t][i]) for a in arms] for t, i in rows]
    columns = [a.label for a in arms]
    labels = [f"{_short(t)} · seed {seed_numbers[i]}" for t, i in rows]
    w, h = cells[0][0].size
    scale = max(1, -(-MIN_CELL // min(w, h)))  # as studio.grid.assemble enlarges
    cw = w * scale
    sheet = assemble(cells, [_fit(c, cw) for c in columns], labels)
    shown = [m for m in dict.fromkeys(metrics) if any(m in a.scores() for a in arms)]
    if not shown:
        return sheet
    out = Image.new("RGB", (sheet.width, sheet.height + len(shown) * FOOTER_LINE + GRID_PAD), "white")
    out.paste(sheet, (0, 0))
    draw = ImageDraw.Draw(out)
    font = _font(12)
    left = sheet.width - len(arms) * (cw + GRID_PAD) - GRID_PAD
    for c, arm in enumerate(arms):
        scores = arm.scores()
        x0 = left + GRID_PAD + c * (cw + GRID_PAD)
        for line, metric in enumerate(shown):
            value = scores.get(metric)
            text = _fit(f"{METRIC_NAMES.get(metric, metric)} {'—' if value is None else f'{value:.3f}'}", cw, font)
            width = _text_width(font, text)
            draw.text((x0 + max(0, (cw - width) // 2), sheet.height + line * FOOTER_LINE), text, fill="black",
                      font=font)
    return out


# -- helpers --------------------------------------------------------------------------------------
def _check_arms(arms: Sequence[Arm]) -> list[Arm]:
    arms = list(arms)
    if not any(not a.is_base for a in arms):
        raise StudioError("Give at least one concept to compare (the base alone needs a concept to name its subject).")
    if len(arms) > MAX_ARMS:
        raise StudioError(f"At most {MAX_ARMS} columns can be compared, got {len(arms)}.")
    labels = [a.label for a in arms]
    if any(not str(label).strip() for label in labels):
        raise StudioError("Every compared column needs a label.")
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise StudioError(f"Two columns share the label {', '.join(twice)}; give each arm its own label.")
    return arms


def _load(studio: Any, entry: ConceptEntry) -> Concept:
    if isinstance(entry, Concept):
        return entry
    source = entry.source if isinstance(entry, ConceptUse) else str(entry)
    path = studio.library.resolve(source) if studio is not None else Path(source).expanduser()
    if not path.is_file():
        raise StudioError(f"No concept file {path}; pass a .safetensors concept (or a library name via Studio).")
    return load_concept(path)


def _templates(cfg: EvaluateConfig, resolved: EvaluateConfig, reference: Concept) -> tuple[list[str], str, int]:
    """The prompt templates every arm shares, the protocol's name and its images per prompt."""
    prompts = cfg.prompts
    if prompts is not None:
        templates = read_prompt_file(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        name, per_prompt = (f"file:{prompts}" if isinstance(prompts, (str, Path)) else "prompts"), 4
    elif resolved.protocol is None:
        templates, name, per_prompt = list(MULTI_PROMPTS), "multi", 4
    else:
        chosen = load_protocol(resolved.protocol, reference.class_word)
        templates, name, per_prompt = list(chosen.templates), chosen.name, chosen.images_per_prompt
    templates = list(dict.fromkeys(t.strip() for t in templates if t.strip()))
    if not templates:
        raise StudioError("No prompts to compare.")
    for t in templates:
        if "{}" not in t and not re.search(r"\{\d+\}", t):
            raise StudioError(f"Prompt {t!r} has no {{}}: write {{}} where each column's concept goes (the same "
                              "prompt is rendered for every column).")
    return templates, name, per_prompt


def _base_prompt(template: str, concepts: Sequence[Concept]) -> str:
    """The template for the base alone: ``{}`` → the class nouns ("a photo of a dog"), ``{0}`` … → each."""
    nouns = [c.class_word or "" for c in concepts]
    if "{}" in template:
        text = template.replace("{}", " and ".join(n for n in nouns if n))
    else:
        try:
            text = template.format(*nouns)
        except (IndexError, KeyError, ValueError):
            raise StudioError(f"Prompt {template!r} names a concept number that was not given "
                              f"({len(concepts)} concept(s)).") from None
    return " ".join(text.split())


def _references(references: Any, concept_arms: Sequence[Arm]) -> list[Any]:
    """One ``references`` argument of :func:`~studio.evaluation.evaluate.prepare` per arm with concepts."""
    if references is None or references == [] or references == ():
        return [None] * len(concept_arms)
    if isinstance(references, (list, tuple)):
        if len(references) != len(concept_arms):
            raise StudioError(f"Got {len(references)} reference entries for {len(concept_arms)} columns with "
                              "concepts; give one folder for all, or one per column, in order.")
        return list(references)
    return [[references] * len(a.concepts) if len(a.concepts) > 1 else references for a in concept_arms]


def _grid_rows(templates: Sequence[str], seeds: int, arms: int, max_cells: int) -> list[tuple[str, int]]:
    """Every (template, seed index) when they fit in ``max_cells`` images, else the first seeds of each
    template (and, if even one seed each is too many, the first templates)."""
    per = max(1, min(seeds, max_cells // max(1, len(templates) * arms)))
    kept = list(templates)
    if len(kept) * per * arms > max_cells:
        kept = kept[: max(1, max_cells // (per * arms))]
    return [(t, i) for t in kept for i in range(per)]


def _cell(image: Image.Image) -> Image.Image:
    if min(image.size) <= MAX_CELL:
        return image
    factor = MAX_CELL / min(image.size)
    return image.convert("RGB").resize((round(image.width * factor), round(image.height * factor)),
                                       Image.Resampling.LANCZOS)


def _short(template: str, limit: int = 40) -> str:
    return template if len(template) <= limit else template[: limit - 1] + "…"


def _fit(text: str, width: int, font: Any = None) -> str:
    """``text`` cut (with "…") to fit ``width`` pixels in ``font`` (default: the grid's 14 px labels)."""
    font = font or _font(14)
    if _text_width(font, text) <= width - 4:
        return text
    while len(text) > 1 and _text_width(font, text + "…") > width - 4:
        text = text[:-1]
    return text + "…"




def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "arm"


def _parameters(arms: Sequence[ArmResult], settings: dict[str, Any]) -> str:
    """The sheet's ``parameters`` PNG text: the columns and the shared settings."""
    return (f"A/B comparison: {' | '.join(f'{r.label} ({r.concepts_text()})' for r in arms)}\n"
            f"Protocol: {settings['protocol']}, Seeds: {settings['seeds']} from {settings['seed']}, "
            f"Steps: {settings['steps']}, CFG scale: {settings['guidance']:g}, Judge: {settings['scorer']}, "
            f"Model: {settings['base']}, Model hash: {settings['base_identity']}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


__all__ = ["BASE_LABEL", "MAX_ARMS", "MAX_CELL", "Arm", "ArmResult", "Comparison", "arms_for_concepts",
           "arms_for_strengths", "compare", "concept_label", "parse_strengths", "side_by_side"]
