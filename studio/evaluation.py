"""Measured quality for concepts: generate, score, report, and write the scores into the concept.

:func:`evaluate_concepts` runs one evaluation end to end:

1. prompts from a protocol (:func:`load_protocol`: ``dreambench-object``, ``dreambench-live``,
   ``world``) or a prompt file, ``{}`` standing for each concept as its method was trained
   (:func:`subject`: "a {} in the snow" → "a <my-dog> in the snow" for textual inversion, NeTI
   and Perfusion, "a <sks> dog in the snow" for DreamBooth); several concepts share every prompt
   ("a <a> and <b> dog in the snow");
2. the judges are loaded first, so a missing model fails before anything is generated:
   ``scorer="clip"`` — CLIP-T, CLIP-I (+ DINO with a ``dino_model``; CP-CLIP/TI-CLIP with a detector
   when several concepts are evaluated), :mod:`studio.metrics`; ``scorer="oracle"`` — the demo
   world's oracle: *fidelity* = P(the image shows the world's concept), *editability* = whether the
   oracle reads the background/size the prompt asks for;
3. ``seeds`` images per prompt (image ``i`` uses seed ``seed + i``, as ``python -m studio generate
   --num-images``), generated in batches with the concepts applied once per strength setting;
4. one :class:`~studio.metrics.Report` — each image encoded once per backbone, shared by every
   metric (an :class:`~studio.metrics.EmbeddingCache`) — with the time split between loading,
   generation and scoring in ``report.settings["timing"]``;
5. ``report.json``, ``contact_sheet.png``, ``scatter.png`` (fidelity against prompt fidelity) and the
   images in ``out_dir``; the summary goes into each concept file's ``studio.metrics["eval"]``
   (rewritten atomically).

:func:`sweep_strength` does the same across strengths, plots the fidelity/editability front and
stores the recommended strength (``Concept.strength``). :class:`CurveTracker` scores a concept
along training (``--eval-every``; driven by :mod:`trainers.runner`).

Reference photos: a folder per concept (``references``), or the embeddings stored in the concept
file (``ref.clip``/``ref.dino``, :func:`attach_reference_embeddings`) when no folder is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from studio.concept import Concept
from studio.errors import StudioError
from studio.generation import ConceptUse, GenerateConfig, applied, effective_strengths, parameters_text
from studio.methods import get_method, load_concept, save_concept
from studio.metrics import (
    CachedScorer,
    Choice,
    ClipScorer,
    Detector,
    DinoScorer,
    EmbeddingCache,
    EvalConcept,
    ImageRecord,
    Report,
    Scorer,
    TradeoffPoint,
    best_checkpoint,
    evaluate,
    image_key,
    pareto_front,
    plot_report,
    plot_sweep,
    points_from_reports,
    recommend_strength,
    scatter_plot,
    write_report,
)
from studio.metrics.formulas import summarize
from studio.metrics.scorers import DEFAULT_CLIP
from studio.metrics.texts import TEXT_MODES, TextMode
from studio.prompts import rewrite

ScorerKind = Literal["clip", "oracle"]
PROTOCOL_DIR = Path(__file__).resolve().parent / "assets" / "protocols"
PROTOCOLS = ("dreambench", "dreambench-object", "dreambench-live", "world")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Prompts for several concepts when none are given: every prompt names all of them ({} = "a <a> cat and <b> dog").
MULTI_PROMPTS = ("a photo of {}", "{} on the beach", "{} in the snow", "{} in a living room")
# Held-out prompts scored during training (a DreamBench subset: places, and a change of colour).
TRAINING_PROMPTS = ("a {} in the jungle", "a {} in the snow", "a {} with a city in the background", "a red {}")


# ----------------------------------------------------------------------------------------------
# Prompts and protocols
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """A named prompt list: ``templates`` hold ``{}`` where the concept goes."""

    name: str
    templates: tuple[str, ...]
    images_per_prompt: int = 4
    source: str = ""


def load_protocol(name: str, class_word: str = "") -> Protocol:
    """``dreambench-object`` / ``dreambench-live`` (25 prompts each, from ``assets/protocols/dreambench.json``),
    ``dreambench`` (live for a ``cat``/``dog`` class word, object otherwise, as in the paper) or
    ``world`` (the demo world's evaluation prompts)."""
    if name == "world":
        from studio.world import CONCEPT

        return Protocol("world", tuple(p.template for p in CONCEPT.eval_prompts), 4, "studio.world.CONCEPT")
    if name not in PROTOCOLS:
        raise StudioError(f"Unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}.")
    path = PROTOCOL_DIR / "dreambench.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise StudioError(f"The DreamBench protocol file {path} is unreadable ({err}); run "
                          "python scripts/build_protocols.py.") from None
    kind = name.removeprefix("dreambench-") if name != "dreambench" else (
        "live" if class_word.strip().lower() in data["live_classes"] else "object")
    return Protocol(f"dreambench-{kind}", tuple(data["prompts"][kind]), int(data["images_per_prompt"]), data["source"])


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (``{}`` = the concept, or literal triggers); blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise StudioError(f"Cannot read the prompt file {path} ({err}).") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise StudioError(f"The prompt file {path} holds no prompts (one per line, {{}} where the concept goes).")
    return prompts


def subject(concept: Concept) -> str:
    """What ``{}`` becomes for one concept, as its method was trained: the trigger alone where it
    names the whole subject (textual inversion, NeTI, Perfusion: ``"a photo of <tok>"``), else
    ``"<trigger> class"`` (DreamBench's ``"sks dog"``)."""
    if concept.method and getattr(get_method(concept.method), "trigger_is_subject", False):
        return concept.trigger
    return f"{concept.trigger} {concept.class_word}".strip()


def build_prompts(templates: Sequence[str], concepts: Sequence[Concept]) -> list[str]:
    """Prompts naming the concepts by trigger: ``{}`` → every concept (joined by "and"), ``{0}``,
    ``{1}`` … → one each; a template already holding every trigger is kept. Duplicates are dropped."""
    joint = " and ".join(subject(c) for c in concepts)
    out: list[str] = []
    for template in templates:
        if "{}" in template:
            prompt = template.replace("{}", joint)
        elif re.search(r"\{\d+\}", template):
            try:
                prompt = template.format(*(subject(c) for c in concepts))
            except (IndexError, KeyError, ValueError):
                raise StudioError(f"Prompt {template!r} names a concept number that was not given "
                                  f"({len(concepts)} concept(s)).") from None
        else:
            prompt = template
        missing = [c.trigger for c in concepts if c.trigger not in prompt and f"{c.trigger[:-1]}:" not in prompt]
        if missing:
            raise StudioError(f"Prompt {template!r} does not name {', '.join(missing)}; write {{}} where the "
                              "concept goes.")
        if prompt not in out:
            out.append(prompt)
    return out


def _dedupe_class(text: str, nouns: Sequence[str]) -> str:
    """``"a sks dog dog"`` → ``"a sks dog"`` (methods whose prompt text already carries the class noun)."""
    for noun in {n.strip() for n in nouns if n.strip()}:
        text = re.sub(rf"(?<!\w)({re.escape(noun)})(?:\s+{re.escape(noun)})+(?!\w)", r"\1", text)
    return text


# ----------------------------------------------------------------------------------------------
# Reference photos and stored reference embeddings
# ----------------------------------------------------------------------------------------------


def load_reference_images(folder: str | Path) -> list[Image.Image]:
    """The photos of a concept folder (png/jpg/webp/bmp, sorted; ``*.mask.png`` skipped), as RGB."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise StudioError(f"Reference folder {path} does not exist; pass the concept's photo folder.")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and ".mask." not in p.name)
    if not files:
        raise StudioError(f"Reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except OSError as err:
            raise StudioError(f"Cannot read the reference image {file} ({err}).") from None
    return images


def attach_reference_embeddings(concept: Concept, images: Sequence[Image.Image], clip: Scorer,
                                dino: Scorer | None = None) -> Concept:
    """A copy of ``concept`` carrying ``refs["clip"]`` ``(N, D)`` (and ``refs["dino"]``) of ``images``
    and the scorer names (``ref_models``); save it with :func:`~studio.concept.save_concept`."""
    if not images:
        raise StudioError("No reference images were given to embed.")
    refs, models = dict(concept.refs), dict(concept.ref_models)
    for role, scorer in (("clip", clip), ("dino", dino)):
        if scorer is not None:
            refs[role] = scorer.embed_images(list(images)).float().cpu()  # (N, D)
            models[role] = scorer.name
    return replace(concept, refs=refs, ref_models=models)


def _stand_ins(concept: Concept, judges: Judges) -> list[Image.Image]:
    """Reference "images" for a concept known only by its stored embeddings.

    :func:`studio.metrics.evaluate` takes reference images and looks every image up in the embedding
    cache by its content hash before encoding it. Each stored row gets a distinct 1-pixel-high
    stand-in image whose embedding is put in the cache under each judge's backbone name, so the
    stand-ins are never encoded; the stored rows are what is scored.
    """
    roles = [("clip", judges.clip)] + ([("dino", judges.dino)] if judges.dino is not None else [])
    for role, scorer in roles:
        if role not in concept.refs:
            raise StudioError(f"Concept {concept.name} has no stored {role} reference embeddings; pass its photos "
                              "(--images DIR), or store them with --store-refs.")
        made_by = concept.ref_models.get(role, "?")
        if scorer is not None and made_by != scorer.name:
            raise StudioError(f"Concept {concept.name}'s stored {role} references were made with {made_by}, not "
                              f"{scorer.name}; pass its photos (--images DIR) or that model.")
    count = concept.refs["clip"].shape[0]
    if any(concept.refs[role].shape[0] != count for role, _ in roles):
        raise StudioError(f"Concept {concept.name}'s stored reference embeddings disagree on the number of photos.")
    seed = hashlib.sha256(f"{concept.trigger}/{concept.name}".encode()).digest()
    images = [Image.frombytes("RGB", (16, 1), hashlib.sha256(seed + str(k).encode()).digest()[:48].ljust(48, b"\0"))
              for k in range(count)]
    for role, scorer in roles:
        for image, row in zip(images, concept.refs[role]):
            judges.cache.put(scorer.name, "image", image_key(image), row)  # type: ignore[union-attr]
    return images


# ----------------------------------------------------------------------------------------------
# Judges: the models that score
# ----------------------------------------------------------------------------------------------


class WorldJudge:
    """The demo world's oracle as a judge (:mod:`studio.world`).

    Per image: *fidelity* = the oracle's probability that it shows the world's concept (the purple
    dotted circle — meaningful for concepts of that task only); *editability* = the fraction of the
    attributes the prompt asks for in the world's grammar ("on a pink background", "on the left")
    that the oracle reads as asked, ``None`` when the prompt asks for none.
    """

    def __init__(self, device: str | torch.device = "cpu", path: str | Path | None = None) -> None:
        try:
            import studio.world as world
        except ImportError as err:
            raise StudioError(f"The demo world's oracle is not built ({err}); use --scorer clip.") from None
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
    """Load the scoring models. ``scorer`` may be a :class:`~studio.metrics.Scorer` instance (a CLIP-like
    judge injected by the caller); ``detector``: an OWL-ViT hub id or folder, ``"haar"``, or a callable."""
    cache = cache if cache is not None else EmbeddingCache()
    if scorer == "oracle":
        return Judges("oracle", world=WorldJudge(device), cache=cache)
    if isinstance(scorer, str) and scorer != "clip":
        raise StudioError(f"scorer must be 'clip' or 'oracle', got {scorer!r}.")
    clip = ClipScorer(clip_model, device=device) if isinstance(scorer, str) else scorer
    dino = DinoScorer(dino_model, device=device) if dino_model else None
    if isinstance(detector, str):
        from studio.metrics import HaarCascadeDetector, OwlVitDetector

        detector = HaarCascadeDetector() if detector == "haar" else OwlVitDetector(detector, device=device)
    return Judges("clip", clip=clip, dino=dino, detector=detector, cache=cache)


def score_images(images_by_prompt: Mapping[str, Sequence[Image.Image]], concepts: Sequence[EvalConcept],
                 judges: Judges, *, text_mode: TextMode = "class_noun") -> Report:
    """A :class:`~studio.metrics.Report` of generated images (CLIP metrics, or the world oracle's)."""
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


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


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


def render_images(base: Any, uses: Sequence[tuple[Concept, float | None, str]], prompts: Sequence[str], *,
                  seeds: int, seed: int = 0, steps: int = 30, guidance: float = 7.5, batch_size: int = 8,
                  notes: list[str] | None = None) -> dict[str, list[Image.Image]]:
    """``{prompt: [seeds images]}`` with the concepts applied (``(concept, default strength, source)``,
    as :func:`studio.generation.generate`); prompts resolving to the same strengths share one
    application of the concepts. Images carry ``parameters``/``studio`` infos like ``generate``'s."""
    GenerateConfig(prompt=prompts[0] if prompts else "-", seed=seed, steps=steps, guidance=guidance)  # validates
    if not 1 <= seeds <= 64:
        raise StudioError(f"seeds (images per prompt) must be between 1 and 64, got {seeds}.")
    size = int(base.native_size)
    nouns = [c.class_word for c, _, _ in uses]
    groups: dict[tuple[float, ...], list[str]] = {}
    resolved_of = {p: effective_strengths(p, "", uses) for p in prompts}
    for prompt in prompts:
        groups.setdefault(tuple(r.strength for r in resolved_of[prompt]), []).append(prompt)
    out: dict[str, list[Image.Image]] = {p: [] for p in prompts}
    for group in groups.values():
        resolved = resolved_of[group[0]]
        with applied(base, resolved, notes) as replacements:
            jobs = [(p, seed + i) for p in group for i in range(seeds)]
            texts = [_dedupe_class(rewrite(p, replacements), nouns) for p, _ in jobs]
            images = render_batch(base.pipe, texts, [s for _, s in jobs], steps=steps, guidance=guidance,
                                  size=size, batch_size=batch_size)
        for (prompt, s), text, image in zip(jobs, texts, images):
            cfg = GenerateConfig(prompt=prompt, seed=s, steps=steps, guidance=guidance, width=size, height=size,
                                 concepts=[ConceptUse(r.source, r.strength) for r in resolved])
            image.info["parameters"] = parameters_text(cfg, seed=s, base=base, width=size, height=size,
                                                       resolved=resolved)
            image.info["studio"] = json.dumps({
                "prompt": prompt, "text": text, "seed": s, "steps": steps, "guidance": guidance, "width": size,
                "height": size, "base": base.spec, "base_identity": base.identity,
                "concepts": [{"source": r.source, "name": r.concept.name, "trigger": r.concept.trigger,
                              "strength": r.strength} for r in resolved]})
            out[prompt].append(image)
    return out


# ----------------------------------------------------------------------------------------------
# One evaluation, a sweep
# ----------------------------------------------------------------------------------------------


@dataclass
class _Item:
    concept: Concept
    strength: float | None
    source: str
    path: Path | None


@dataclass
class _Run:
    """Everything resolved before generating: the base, concepts, prompts, judges, references."""

    base: Any
    items: list[_Item]
    prompts: list[str]
    protocol: str
    judges: Judges
    eval_concepts: list[EvalConcept]
    seeds: int
    seed: int
    steps: int
    guidance: float
    batch_size: int
    text_mode: TextMode
    fidelity: str
    editability: str
    load_s: float
    notes: list[str] = field(default_factory=list)


def _prepare(target: Any, concepts: Sequence[str | ConceptUse | Concept], *, prompts: Sequence[str] | str | Path | None,
             protocol: str | None, seeds: int | None, seed: int, references: Any, scorer: ScorerKind | Scorer,
             clip_model: str, dino_model: str | None, detector: str | Detector | None, steps: int | None,
             guidance: float | None, batch_size: int, text_mode: TextMode, fidelity: str | None,
             judges: Judges | None) -> _Run:
    t0 = time.monotonic()
    # 1. the base and the concepts (file paths, library names, ConceptUse or in-memory concepts).
    studio = target if hasattr(target, "library") and hasattr(target, "load_concept") else None
    spec = studio.settings.base if studio is not None else getattr(target, "spec", "")
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
        items.append(_Item(load_concept(path), use.strength, use.source, path))
    if text_mode not in TEXT_MODES:
        raise StudioError(f"text_mode must be one of {', '.join(TEXT_MODES)}, got {text_mode!r}.")
    # 2. prompts: a file / list, else a protocol (default: the world's on the demo base, else DreamBench's).
    is_demo = spec == "demo"
    if prompts is not None and protocol is not None:
        raise StudioError("Give prompts or a protocol, not both.")
    if prompts is not None:
        templates = read_prompt_file(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        name, per_prompt = (f"file:{prompts}" if isinstance(prompts, (str, Path)) else "prompts"), 4
    elif len(items) > 1 and protocol is None:
        templates, name, per_prompt = list(MULTI_PROMPTS), "multi", 4
    else:
        chosen = load_protocol(protocol or ("world" if is_demo else "dreambench"), items[0].concept.class_word)
        templates, name, per_prompt = list(chosen.templates), chosen.name, chosen.images_per_prompt
    built = build_prompts(templates, [it.concept for it in items])
    if not built:
        raise StudioError("No prompts to evaluate.")
    # 3. the base, then the judges (loaded before anything is generated).
    base = studio.base if studio is not None else target
    device = getattr(base, "device", "cpu")
    judges = judges or load_judges(scorer, clip_model=clip_model, dino_model=dino_model,
                                   detector=(detector or ("google/owlvit-base-patch32" if len(items) > 1 else None)),
                                   device=device)
    if judges.kind == "oracle" and len(items) > 1:
        raise StudioError("The world's oracle knows one concept; evaluate one concept at a time with --scorer oracle.")
    fid_key, edit_key = judges.keys(fidelity)
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
            refs = _stand_ins(c, judges)
        eval_concepts.append(EvalConcept(c.trigger, c.class_word or c.trigger.strip("<>"), refs, c.name or None))
    if len({ec.label for ec in eval_concepts}) != len(eval_concepts):
        eval_concepts = [replace(ec, name=ec.trigger) for ec in eval_concepts]
    default_steps, default_guidance = 30, 7.5
    if is_demo:
        from studio.world.score import GUIDANCE_SCALE, NUM_STEPS  # the world's own sampling settings

        default_steps, default_guidance = NUM_STEPS, GUIDANCE_SCALE
    return _Run(base, items, built, name, judges, eval_concepts, seeds or per_prompt, seed, steps or default_steps,
                guidance if guidance is not None else default_guidance, batch_size, text_mode, fid_key, edit_key,
                time.monotonic() - t0)


def _once(run: _Run, strengths: Sequence[float | None], out_dir: Path | None, save_images: bool,
          plot: bool = True) -> tuple[Report, dict[str, list[Image.Image]]]:
    """Generate and score at the given strength per concept (``None``: the concept's default)."""
    t0 = time.monotonic()
    uses = [(it.concept, s if s is not None else it.strength, it.source) for it, s in zip(run.items, strengths)]
    images = render_images(run.base, uses, run.prompts, seeds=run.seeds, seed=run.seed, steps=run.steps,
                           guidance=run.guidance, batch_size=run.batch_size, notes=run.notes)
    t1 = time.monotonic()
    report = score_images(images, run.eval_concepts, run.judges, text_mode=run.text_mode)
    t2 = time.monotonic()
    n = sum(len(v) for v in images.values())
    report.settings.update({
        "protocol": run.protocol, "seeds": run.seeds, "seed": run.seed, "steps": run.steps, "guidance": run.guidance,
        "base": getattr(run.base, "name", ""), "base_identity": getattr(run.base, "identity", ""),
        "strengths": {r.concept.name or r.concept.trigger: r.strength for r in effective_strengths("", "", uses)},
        "fidelity": run.fidelity, "editability": run.editability,
        "timing": {"load_s": round(run.load_s, 3), "generation_s": round(t1 - t0, 3), "scoring_s": round(t2 - t1, 3),
                   "images": n, "generation_s_per_image": round((t1 - t0) / max(1, n), 4)},
    })
    if out_dir is not None:
        _write(report, images, out_dir, run, save_images, plot)
    return report, images


def _write(report: Report, images: Mapping[str, Sequence[Image.Image]], out: Path, run: _Run, save: bool,
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


def _record(run: _Run, update: Callable[[Concept, _Item], None]) -> None:
    """Apply ``update`` to each concept file and rewrite it atomically (re-read first: keep others' edits)."""
    for item in run.items:
        if item.path is None:
            update(item.concept, item)
            continue
        concept = load_concept(item.path)
        update(concept, item)
        save_concept(concept, item.path)


def evaluate_concepts(target: Any, concepts: Sequence[str | ConceptUse | Concept], *,
                      prompts: Sequence[str] | str | Path | None = None, protocol: str | None = None,
                      seeds: int | None = None, seed: int = 0, references: Any = None,
                      scorer: ScorerKind | Scorer = "clip", clip_model: str = DEFAULT_CLIP,
                      dino_model: str | None = None, detector: str | Detector | None = None,
                      steps: int | None = None, guidance: float | None = None, batch_size: int = 8,
                      text_mode: TextMode = "class_noun", fidelity: str | None = None,
                      out_dir: str | Path | None = None, save_images: bool = True, write_back: bool = True,
                      store_refs: bool = False, judges: Judges | None = None) -> Report:
    """Generate, score and report one or several concepts (module docstring for the steps).

    Args:
        target: a :class:`~studio.service.Studio` (concepts by file or library name) or a loaded
            :class:`~studio.models.BaseModel` (concept files).
        concepts: files / library names / :class:`~studio.generation.ConceptUse` (with a strength) /
            in-memory :class:`~studio.concept.Concept` s (nothing is written back for those).
        prompts: a prompt file or a list of prompts (``{}`` = the concepts); ``protocol``: a name of
            :data:`PROTOCOLS`. Default: ``world`` on the demo base, else ``dreambench`` (1 concept) or
            :data:`MULTI_PROMPTS`.
        seeds: images per prompt (default: the protocol's, 4); ``seed``: the first seed.
        references: a photo folder, or one per concept (``None``: the embeddings stored in the concept).
        scorer: ``"clip"``, ``"oracle"`` (the demo world's), or a :class:`~studio.metrics.Scorer`.
        clip_model, dino_model: hub ids or folders (DINO only when given); ``detector``: OWL-ViT id or
            folder, or ``"haar"``, for CP-CLIP/TI-CLIP (several concepts only).
        steps, guidance: sampling (default 30 / 7.5; the world's own 20 / 4.0 on the demo base).
        text_mode: the text CLIP-T scores (:mod:`studio.metrics.texts`); ``fidelity``: ``clip_i``/``dino``.
        out_dir: where ``report.json``, ``contact_sheet.png``, ``scatter.png`` and ``images/`` go.
        write_back: store :func:`summary` in each concept file's ``studio.metrics["eval"]``
            (``["eval_multi"]`` when several concepts were evaluated together).
        store_refs: also store the reference photos' embeddings in the concept files.
        judges: already loaded judges (:func:`load_judges`), to reuse across calls.

    Returns:
        The :class:`~studio.metrics.Report`; timings in ``report.settings["timing"]``.
    """
    run = _prepare(target, concepts, prompts=prompts, protocol=protocol, seeds=seeds, seed=seed,
                   references=references, scorer=scorer, clip_model=clip_model, dino_model=dino_model,
                   detector=detector, steps=steps, guidance=guidance, batch_size=batch_size, text_mode=text_mode,
                   fidelity=fidelity, judges=judges)
    if store_refs and (run.judges.kind != "clip" or not references):
        raise StudioError("Storing reference embeddings needs the photos (--images DIR) and --scorer clip.")
    report, _ = _once(run, [None] * len(run.items), Path(out_dir).expanduser() if out_dir else None, save_images)
    if write_back:
        key = "eval" if len(run.items) == 1 else "eval_multi"
        result = summary(report)

        def update(concept: Concept, item: _Item) -> None:
            concept.metrics = dict(concept.metrics) | {key: result | {"source": item.source}}
            if store_refs:
                _store_refs(concept, run, item)

        _record(run, update)
    return report


def _store_refs(concept: Concept, run: _Run, item: _Item) -> None:
    ec = run.eval_concepts[run.items.index(item)]
    assert run.judges.clip is not None  # checked by evaluate_concepts
    scorers = [("clip", run.judges.clip)] + ([("dino", run.judges.dino)] if run.judges.dino is not None else [])
    for role, scorer in scorers:
        concept.refs[role] = CachedScorer(scorer, run.judges.cache).embed_images(list(ec.references))
        concept.ref_models[role] = scorer.name


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


def sweep_strength(target: Any, concept: str | ConceptUse | Concept, strengths: Sequence[float], *,
                   rule: Literal["product", "knee"] = "product", min_editability: float | None = None,
                   out_dir: str | Path | None = None, save_images: bool = False, write_back: bool = True,
                   **options: Any) -> SweepResult:
    """Evaluate one concept at each strength (same prompts and seeds), choose the recommended strength
    (:func:`~studio.metrics.recommend_strength`) and store it in the concept (``Concept.strength``,
    ``studio.metrics["sweep"]``, and ``["eval"]`` at the chosen strength). ``options`` are
    :func:`evaluate_concepts`' (prompts, protocol, seeds, scorer …). Writes ``strength-<s>/``
    (``report.json``, ``contact_sheet.png``), ``sweep.json`` and ``sweep.png`` (the fidelity/editability
    front) to ``out_dir``."""
    values = sorted({float(s) for s in strengths})
    if len(values) < 2:
        raise StudioError(f"A sweep needs at least two different strengths, got {list(strengths)}.")
    for s in values:
        if not 0.0 <= s <= 2.0:
            raise StudioError(f"Sweep strengths must be between 0 and 2, got {s}.")
    run = _prepare(target, [concept], **{**_DEFAULTS, **options})
    out = Path(out_dir).expanduser() if out_dir else None
    reports = []
    for s in values:
        report, _ = _once(run, [s], out / f"strength-{s:g}" if out else None, save_images, plot=False)
        reports.append(report)
    points = points_from_reports(values, reports, fidelity=run.fidelity, editability=run.editability)
    choice = recommend_strength(points, rule=rule, min_editability=min_editability)
    result = SweepResult(values, reports, points, choice, run.fidelity, run.editability)
    if out is not None:
        result.paths["sweep"] = out / "sweep.json"
        result.paths["sweep"].write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        result.paths["plot"] = plot_sweep(points, choice, out / "sweep.png")
    if write_back:
        chosen = summary(reports[choice.index])

        def update(c: Concept, item: _Item) -> None:
            c.strength = choice.value
            c.metrics = dict(c.metrics) | {"sweep": result.to_dict(), "eval": chosen | {"source": item.source}}

        _record(run, update)
    return result


_DEFAULTS: dict[str, Any] = dict(prompts=None, protocol=None, seeds=None, seed=0, references=None, scorer="clip",
                                 clip_model=DEFAULT_CLIP, dino_model=None, detector=None, steps=None, guidance=None,
                                 batch_size=8, text_mode="class_noun", fidelity=None, judges=None)


# ----------------------------------------------------------------------------------------------
# Along training
# ----------------------------------------------------------------------------------------------


class CurveTracker:
    """Scores of one concept along training (``--eval-every``) and the best checkpoint.

    :meth:`add` scores the images of one evaluation; the concept exported at that step is kept while
    its point is on the Pareto front (a dominated point never becomes the best again), so memory stays
    small. :meth:`best` applies :func:`~studio.metrics.best_checkpoint` (``rule``) to all points.
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


def training_judges(eval_model: str | None, base: Any, scorer: Scorer | None = None) -> Judges:
    """Judges for ``--eval-every``: an injected scorer, the world oracle (``"oracle"``; the default on the
    demo base) or a CLIP model (default :data:`~studio.metrics.scorers.DEFAULT_CLIP`)."""
    if scorer is not None:
        return load_judges(scorer)
    model = eval_model or ("oracle" if getattr(base, "spec", "") == "demo" else DEFAULT_CLIP)
    if model == "oracle":
        return load_judges("oracle", device=getattr(base, "device", "cpu"))
    return load_judges("clip", clip_model=model, device=getattr(base, "device", "cpu"))


def training_prompts(prompt_file: str | None, base: Any) -> list[str]:
    """Held-out templates for ``--eval-every``: the file's, the world's on the demo base, else :data:`TRAINING_PROMPTS`."""
    if prompt_file:
        return read_prompt_file(prompt_file)
    if getattr(base, "spec", "") == "demo":
        return list(load_protocol("world").templates)
    return list(TRAINING_PROMPTS)


def live_text(prompt: str, trigger: str, text: str, class_word: str) -> str:
    """A display prompt (``"a <tok> dog in the snow"``) with the trigger replaced by the trainer's live
    text (``"<tok> <tok>#1"``; a class noun repeated by it is collapsed)."""
    return _dedupe_class(rewrite(prompt, {trigger: text}), [class_word])
