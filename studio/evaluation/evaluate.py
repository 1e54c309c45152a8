"""One evaluation end to end (:func:`evaluate_concepts`), its files and the summary kept in the concept.

The steps (the package docstring has the whole story): resolve the concepts, prompts and judges
(:func:`prepare` — judges load before anything is generated), render (:mod:`.render`), score
(:func:`~studio.evaluation.judges.score_images`), write ``report.json`` / ``contact_sheet.png`` /
``scatter.png`` / ``images/`` and store :func:`summary` in each concept file (:func:`record`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from PIL import Image

from studio.concept import Concept
from studio.errors import StudioError
from studio.evaluation.config import EvaluateConfig
from studio.evaluation.judges import DEFAULT_DETECTOR, Judges, ScorerKind, load_judges, score_images
from studio.evaluation.metrics import (
    CachedScorer,
    Detector,
    EvalConcept,
    Report,
    Scorer,
    plot_report,
    scatter_plot,
    write_report,
)
from studio.evaluation.metrics.texts import TextMode
from studio.evaluation.protocols import MULTI_PROMPTS, build_prompts, load_protocol, read_prompt_file
from studio.evaluation.references import load_reference_images, stand_ins
from studio.evaluation.render import render_images
from studio.generation import ConceptEntry, ConceptUse, effective_strengths
from studio.methods import load_concept, save_concept
from studio.prompts import StageStrengths


@dataclass
class _Item:
    concept: Concept
    strength: float | None
    source: str
    path: Path | None
    stages: StageStrengths | None = None  # per-stage strengths (``--concept FILE@0-4``; staged methods only)


@dataclass
class Run:
    """Everything resolved before generating: the base, concepts, prompts, judges, references, and the
    config with the base's defaults filled in."""

    base: Any
    items: list[_Item]
    prompts: list[str]
    protocol: str
    judges: Judges
    eval_concepts: list[EvalConcept]
    config: EvaluateConfig
    seeds: int
    fidelity: str
    editability: str
    load_s: float
    notes: list[str] = field(default_factory=list)


def split_options(config: EvaluateConfig | None, options: dict[str, Any]) -> tuple[EvaluateConfig, dict[str, Any]]:
    """``config`` (default :class:`EvaluateConfig`) with the keyword ``options`` applied, and the objects
    among them that are not options: a :class:`~studio.evaluation.metrics.Scorer` given as ``scorer`` or a
    :class:`~studio.evaluation.metrics.Detector` given as ``detector`` (injected judges)."""
    injected = {key: options.pop(key) for key in ("scorer", "detector")
                if options.get(key) is not None and not isinstance(options[key], str)}
    return (config or EvaluateConfig()).with_options(**options), injected


def prepare(target: Any, concepts: Sequence[str | ConceptUse | Concept], config: EvaluateConfig, *,
            references: Any = None, judges: Judges | None = None, scorer: Scorer | None = None,
            detector: Detector | None = None) -> Run:
    """Resolve the concepts, prompts, judges and references of one evaluation (nothing is generated)."""
    t0 = time.monotonic()
    # 1. the concepts (file paths, library names, ConceptUse or in-memory concepts).
    studio = target if hasattr(target, "library") and hasattr(target, "load_concept") else None
    if not concepts:
        raise StudioError("Give at least one concept to evaluate (--concept FILE).")
    items = []
    for entry in concepts:
        if isinstance(entry, Concept):
            items.append(_Item(entry, None, entry.name or entry.trigger, None))
            continue
        use = entry if isinstance(entry, ConceptUse) else ConceptUse(str(entry))
        path = studio.library.resolve(use.source) if studio is not None else Path(use.source).expanduser()
        if not path.is_file():
            raise StudioError(f"No concept file {path}; pass a .safetensors concept (or a library name via Studio).")
        items.append(_Item(load_concept(path), use.strength, use.source, path, use.stages))
    # 2. prompts: a file / list, else a protocol (default: the base's), else the shared multi-concept prompts.
    prompts = config.prompts
    templates = read_prompt_file(prompts) if isinstance(prompts, (str, Path)) else list(prompts or [])
    base = studio.base if studio is not None else target
    cfg = config.for_base(base.profile, concepts=len(items))
    if prompts is not None:
        name, per_prompt = (f"file:{prompts}" if isinstance(prompts, (str, Path)) else "prompts"), 4
    elif cfg.protocol is None:
        templates, name, per_prompt = list(MULTI_PROMPTS), "multi", 4
    else:
        chosen = load_protocol(cfg.protocol, items[0].concept.class_word)
        templates, name, per_prompt = list(chosen.templates), chosen.name, chosen.images_per_prompt
    built = build_prompts(templates, [it.concept for it in items])
    if not built:
        raise StudioError("No prompts to evaluate.")
    # 3. the judges (loaded before anything is generated).
    judges = judges or load_judges(
        # cfg.scorer: set by for_base; load_judges refuses a name other than "clip" / "oracle"
        scorer if scorer is not None else cast(ScorerKind, cfg.scorer), clip_model=cfg.clip_model,
        dino_model=cfg.dino_model,
        detector=detector or cfg.detector or (DEFAULT_DETECTOR if len(items) > 1 else None),
        device=getattr(base, "device", "cpu"))
    if judges.kind == "oracle" and len(items) > 1:
        raise StudioError("The world's oracle knows one concept; evaluate one concept at a time with --scorer oracle.")
    fid_key, edit_key = judges.keys(cfg.fidelity)
    # 4. references: a folder per concept, else the embeddings stored in the concept file.
    folders = list(references) if isinstance(references, (list, tuple)) else [references] * (1 if references else 0)
    if folders and len(folders) != len(items):
        raise StudioError(f"Got {len(folders)} reference folders for {len(items)} concepts; give one per concept, "
                          "in the same order.")
    eval_concepts = []
    for k, item in enumerate(items):
        c = item.concept
        if judges.kind == "oracle":
            refs: Sequence[Image.Image] = [Image.new("RGB", (1, 1))]  # the oracle needs no photos
        elif folders and folders[k]:
            refs = load_reference_images(folders[k])
        else:
            refs = stand_ins(c, judges)
        eval_concepts.append(EvalConcept(c.trigger, c.class_word or c.trigger.strip("<>"), refs, c.name or None))
    if len({ec.label for ec in eval_concepts}) != len(eval_concepts):
        eval_concepts = [replace(ec, name=ec.trigger) for ec in eval_concepts]
    return Run(base, items, built, name, judges, eval_concepts, cfg, cfg.seeds or per_prompt, fid_key, edit_key,
               time.monotonic() - t0)


def once(run: Run, strengths: Sequence[float | None], out_dir: Path | None, plot: bool = True,
         ) -> tuple[Report, dict[str, list[Image.Image]]]:
    """Generate and score at the given strength per concept (``None``: the concept's default)."""
    t0 = time.monotonic()
    cfg = run.config
    assert cfg.steps is not None and cfg.guidance is not None  # filled in by for_base (see prepare)
    uses: list[ConceptEntry] = [(it.concept, s if s is not None else it.strength, it.source, it.stages)
                                for it, s in zip(run.items, strengths)]
    images = render_images(run.base, uses, run.prompts, seeds=run.seeds, seed=cfg.seed, steps=cfg.steps,
                           guidance=cfg.guidance, batch_size=cfg.batch_size, notes=run.notes,
                           decor_words=cfg.decor_words, decor_strength=cfg.decor_strength)
    t1 = time.monotonic()
    report = score_images(images, run.eval_concepts, run.judges,
                          text_mode=cast(TextMode, cfg.text_mode))  # checked against TEXT_MODES by the config
    t2 = time.monotonic()
    n = sum(len(v) for v in images.values())
    resolved = effective_strengths("", "", uses)
    staged = {r.concept.name or r.concept.trigger: list(r.stages) for r in resolved if r.stages is not None}
    report.settings.update({
        "protocol": run.protocol, "seeds": run.seeds, "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance,
        "base": getattr(run.base, "name", ""), "base_identity": getattr(run.base, "identity", ""),
        "strengths": {r.concept.name or r.concept.trigger: r.strength for r in resolved},
        **({"stages": staged} if staged else {}),  # one strength per denoising stage (stage 0 = the noisiest)
        "fidelity": run.fidelity, "editability": run.editability,
        **({"decor": {"words": cfg.decor_words, "strength": cfg.decor_strength}} if cfg.decor_words else {}),
        "timing": {"load_s": round(run.load_s, 3), "generation_s": round(t1 - t0, 3), "scoring_s": round(t2 - t1, 3),
                   "images": n, "generation_s_per_image": round((t1 - t0) / max(1, n), 4)},
    })
    if out_dir is not None:
        _write(report, images, out_dir, run, cfg.save_images, plot)
    return report, images


def _write(report: Report, images: Mapping[str, Sequence[Image.Image]], out: Path, run: Run, save: bool,
           plot: bool) -> None:
    from studio.generation import png_info

    write_report(report, out, images_by_prompt=images, plot=False)
    if plot and run.judges.kind == "oracle":
        prompts = list(images)
        xs = [_mean([r.clip_t for r in report.records if r.prompt == p]) for p in prompts]
        ys = [_mean([v for r in report.records if r.prompt == p for v in r.clip_i.values()]) for p in prompts]
        scatter_plot(xs, ys, out / "scatter.png", labels=prompts, xlabel="editability (oracle)",
                     ylabel="fidelity (oracle P(concept))", title=run.judges.world.name if run.judges.world else "")
    elif plot:
        plot_report(report, out / "scatter.png", fidelity=run.fidelity)
    if save:
        folder = out / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for p_index, group in enumerate(images.values()):
            for image in group:
                seed = json.loads(image.info["studio"])["seed"]
                image.save(folder / f"p{p_index:02d}-s{seed}.png", format="PNG", pnginfo=png_info(image))


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def summary(report: Report) -> dict[str, Any]:
    """The compact, JSON-ready summary stored in a concept's metadata (``studio.metrics["eval"]``)."""
    s = report.settings
    return {
        "scores": {k: round(v.mean, 6) for k, v in report.summaries.items() if math.isfinite(v.mean)},
        "fidelity": s.get("fidelity"), "editability": s.get("editability"),
        "backbones": dict(report.backbones), "protocol": s.get("protocol"), "prompts": s.get("prompts"),
        "images": s.get("images"), "seeds": s.get("seeds"), "steps": s.get("steps"), "guidance": s.get("guidance"),
        "strengths": s.get("strengths"), "base": s.get("base"), "clip_t_text": s.get("clip_t_text"),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_summary(report: Report) -> str:
    """Human-readable lines: each score with its backbone, then the time split."""
    lines = [f"{key:<16} {value.mean:.4f}  (n={value.count}, {value.backbone})"
             for key, value in report.summaries.items()]
    t = report.settings.get("timing", {})
    if t:
        lines.append(f"time: loading {t['load_s']:.1f} s, generation {t['generation_s']:.1f} s "
                     f"({t['images']} images, {t['generation_s_per_image']:.2f} s each), scoring {t['scoring_s']:.1f} s")
    return "\n".join(lines)


def record(run: Run, update: Callable[[Concept, _Item], None]) -> None:
    """Apply ``update`` to each concept file and rewrite it atomically (re-read first: keep others' edits)."""
    for item in run.items:
        if item.path is None:
            update(item.concept, item)
            continue
        concept = load_concept(item.path)
        update(concept, item)
        save_concept(concept, item.path)


def evaluate_concepts(target: Any, concepts: Sequence[str | ConceptUse | Concept],
                      config: EvaluateConfig | None = None, *, references: Any = None,
                      judges: Judges | None = None, **options: Any) -> Report:
    """Generate, score and report one or several concepts (the package docstring has the steps).

    Args:
        target: a :class:`~studio.service.Studio` (concepts by file or library name) or a loaded
            :class:`~studio.models.BaseModel` (concept files).
        concepts: files / library names / :class:`~studio.generation.ConceptUse` (with a strength) /
            in-memory :class:`~studio.concept.Concept` s (nothing is written back for those).
        config: the options (:class:`~studio.evaluation.config.EvaluateConfig`; ``None`` fields: the
            base's protocol, judge, steps and guidance).
        references: a photo folder, or one per concept (``None``: the embeddings stored in the concept).
        judges: already loaded judges (:func:`~studio.evaluation.judges.load_judges`), to reuse across calls.
        options: :class:`EvaluateConfig` fields overriding ``config`` (``seeds=1, out_dir=...``);
            ``scorer`` / ``detector`` may also be a :class:`~studio.evaluation.metrics.Scorer` /
            :class:`~studio.evaluation.metrics.Detector` instance.

    Returns:
        The :class:`~studio.evaluation.metrics.Report`; timings in ``report.settings["timing"]``. With
        ``write_back`` the :func:`summary` goes into each concept file's ``studio.metrics["eval"]``
        (``["eval_multi"]`` when several concepts were evaluated together).
    """
    cfg, injected = split_options(config, options)
    run = prepare(target, concepts, cfg, references=references, judges=judges, **injected)
    if cfg.store_refs and (run.judges.kind != "clip" or not references):
        raise StudioError("Storing reference embeddings needs the photos (--images DIR) and --scorer clip.")
    report, _ = once(run, [None] * len(run.items), Path(cfg.out_dir).expanduser() if cfg.out_dir else None)
    if cfg.write_back:
        key = "eval" if len(run.items) == 1 else "eval_multi"
        result = summary(report)

        def update(concept: Concept, item: _Item) -> None:
            concept.metrics = dict(concept.metrics) | {key: result | {"source": item.source}}
            if cfg.store_refs:
                _store_refs(concept, run, item)

        record(run, update)
    return report


def _store_refs(concept: Concept, run: Run, item: _Item) -> None:
    ec = run.eval_concepts[run.items.index(item)]
    assert run.judges.clip is not None  # checked by evaluate_concepts
    scorers = [("clip", run.judges.clip)] + ([("dino", run.judges.dino)] if run.judges.dino is not None else [])
    for role, scorer in scorers:
        concept.refs[role] = CachedScorer(scorer, run.judges.cache).embed_images(list(ec.references))
        concept.ref_models[role] = scorer.name
