"""Generation: a :class:`GenerateConfig` in, PIL images carrying their parameters out.

Concepts of any mix of methods are applied for the call and removed afterwards, so the
pipeline is the plain base between calls. Same config + same seed → same pixels on CPU (each
image ``i`` draws its noise from a CPU generator seeded with ``seed + i``).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.concept import Concept, check_compatible
from studio.configs import option
from studio.errors import StudioError
from studio.methods import get_method
from studio.methods.decor import (
    DEFAULT_STRENGTH,
    STRENGTH_HELP,
    WORDS_HELP,
    check_settings,
    decor_applied,
    parameters_fields,
)
from studio.methods.zeroshot.adapter import PRESETS as ADAPTER_PRESETS
from studio.models.keys import file_sha256
from studio.prompts import MAX_STRENGTH, StageStrengths, check_strength, find_triggers, rewrite

# Scheduler names → (diffusers class name, extra config). What A1111 calls each: :func:`a1111_sampler`.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
# diffusers scheduler class → the sampler name A1111 writes (its labels in modules/sd_samplers_kdiffusion.py,
# sd_samplers_timesteps.py and sd_samplers_lcm.py; the pairing is diffusers' own table of A1111 equivalents).
# A name A1111 does not know would be read as its default sampler, so a class without an equivalent
# (DDPM, DEIS …) writes no Sampler field. DPMSolverMultistepScheduler depends on its config: see a1111_sampler.
A1111_SAMPLERS: dict[str, str] = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "FlowMatchEulerDiscreteScheduler": "Euler",  # SD 3 / FLUX (Forge labels their sampler Euler too)
}
# diffusers' sigma-schedule switches → A1111's "Schedule type" label (modules/sd_schedulers.py).
A1111_SCHEDULE_TYPES = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "Exponential",
                        "use_beta_sigmas": "Beta"}
MAX_IMAGES = 64


@dataclass
class ConceptUse:
    """A concept for one generation: a file path or library name, and an optional default strength
    (a strength written in the prompt wins)."""

    source: str
    strength: float | None = None
    stages: StageStrengths | None = None  # per-stage strengths (``FILE@0-3``; staged methods only)

    def __post_init__(self) -> None:
        if isinstance(self.stages, dict):  # from a request's JSON (``asdict``)
            values, on = self.stages.get("values"), self.stages.get("on")
            self.stages = StageStrengths(values=None if values is None else tuple(map(float, values)),
                                         on=None if on is None else tuple(map(int, on)))


@dataclass
class GenerateConfig:
    """One generation request — the one source of generation settings: the CLI flags
    (``python -m studio generate``), the UI's defaults and the Python API all derive from these fields.

    ``steps`` and ``guidance`` left at None take the loaded base's (:attr:`BaseModel.profile`):
    30 / 7.5 for Stable Diffusion bases, the demo world's own 20 / 4.0 there."""

    prompt: str = field(metadata={"help": "prompt; trigger tokens as <tok> or <tok:0.8>", "group": "prompt"})
    negative_prompt: str = option("", "negative prompt", group="prompt")
    seed: int = option(0, "random seed; image i uses seed + i", group="sampling")
    steps: int | None = option(None, "sampler steps (default: the base's, 30 for Stable Diffusion)", group="sampling")
    guidance: float | None = option(None, "classifier-free guidance scale, ≤ 1 disables it (default: the base's, "
                                    "7.5 for Stable Diffusion)", group="sampling")
    width: int | None = option(None, "image width (default: the base's native size)", group="sampling")
    height: int | None = option(None, "image height (default: the base's native size)", group="sampling")
    scheduler: str = option("default", "sampler: default keeps the base's", choices=["default", *SCHEDULERS],
                            group="sampling")
    num_images: int = option(1, "images to render", group="sampling")
    concepts: list[ConceptUse] = field(default_factory=list, metadata={"hidden": True})  # the CLI's --concept
    # Zero-shot image prompt (IP-Adapter): reference image files (or folders); encoded for this call.
    reference_images: list[str] = option([], "reference image (or folder) whose subject/style the images take on "
                                         "(repeatable)", flag="--reference-image", group="image prompt",
                                         path="folder")
    reference_scale: float = option(1.0, "adapter scale: 0 = off (exactly the plain pipeline), 1 = full",
                                    group="image prompt")
    adapter: str | None = option(None, "IP-Adapter: preset (sd15, sd15-plus, sdxl …), file, folder or hub path "
                                 "(default: the base's usual one)", group="image prompt", path="model",
                                 names=tuple(ADAPTER_PRESETS))
    image_encoder: str | None = option(None, "CLIP image-encoder folder, when not beside the adapter",
                                       group="image prompt", path="model")
    reference_mask: str | None = option(None, "mask image: white where the reference acts (regional image prompt)",
                                        group="image prompt", path="file")
    # Perfusion concepts: key locking ("local", "global"; None = each concept's own default) and,
    # with several Perfusion concepts, the orthogonal term ("approx" = the sum, "exact" = Appendix B).
    perfusion_locking: str | None = option(None, "Perfusion key locking: local (the concept's keys) or global (the "
                                           "whole prompt's keys locked to the class word); default: each concept's "
                                           "own", choices=["local", "global"], group="Perfusion concepts")
    perfusion_orthogonal: str = option("approx", "several Perfusion concepts: approx (sum of each concept's term) or "
                                       "exact (Appendix B)", choices=["approx", "exact"], group="Perfusion concepts")
    # Fast paths (studio.models.speed, studio.methods.lora.fuse): how fast, never what is drawn (beyond rounding).
    fuse_lora: bool = option(True, "fold LoRA concepts into the weights for the call (sampling as fast as the base; "
                             "the weights are restored exactly afterwards); off: PEFT adapters at every step",
                             group="speed")
    vae_tiling: bool = option(False, "decode the image tile by tile (large images in little memory; tiles are "
                              "blended, so pixels differ slightly)", group="speed")
    channels_last: bool = option(False, "UNet convolution weights in channels-last layout for the call (faster on "
                                 "recent GPUs)", group="speed")
    compile: bool = option(False, "torch.compile the UNet (the first call compiles for minutes, later calls of the "
                           "same size are faster)", group="speed")
    # DECOR (studio.methods.decor): the named words' directions projected out of the prompt's text embeddings.
    decor_words: list[str] = option([], WORDS_HELP, group="DECOR")
    decor_strength: float = option(DEFAULT_STRENGTH, STRENGTH_HELP, group="DECOR")

    def resolved(self, profile: Any) -> GenerateConfig:
        """This request with the settings left to the base filled from ``profile`` (a :class:`BaseProfile`)."""
        return replace(self, steps=profile.steps if self.steps is None else self.steps,
                       guidance=profile.guidance if self.guidance is None else self.guidance)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise StudioError("The prompt is empty; describe the image to generate.")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise StudioError(f"steps must be between 1 and 1000, got {self.steps}.")
        if self.guidance is not None and not 0 <= self.guidance <= 50:
            raise StudioError(f"guidance must be between 0 and 50, got {self.guidance}.")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise StudioError(f"num_images must be between 1 and {MAX_IMAGES}, got {self.num_images}.")
        if self.scheduler != "default" and self.scheduler not in SCHEDULERS:
            raise StudioError(f"Unknown scheduler {self.scheduler!r}; use default or one of {', '.join(SCHEDULERS)}.")
        if not 0 <= self.seed < 2**63:
            raise StudioError(f"seed must be a non-negative 63-bit integer, got {self.seed}.")
        for side in (self.width, self.height):
            if side is not None and not 8 <= side <= 4096:
                raise StudioError(f"width and height must be between 8 and 4096 pixels, got {side}.")
        self.concepts = [c if isinstance(c, ConceptUse) else ConceptUse(**c) for c in self.concepts]
        if not 0 <= self.reference_scale <= MAX_STRENGTH:
            raise StudioError(f"reference_scale must be between 0 and {MAX_STRENGTH}, got {self.reference_scale}.")
        if self.perfusion_locking not in (None, "local", "global"):
            raise StudioError(f"perfusion_locking must be local or global, got {self.perfusion_locking!r}.")
        if self.perfusion_orthogonal not in ("approx", "exact"):
            raise StudioError(f"perfusion_orthogonal must be approx or exact, got {self.perfusion_orthogonal!r}.")
        if (self.adapter or self.image_encoder or self.reference_mask) and not self.reference_images:
            raise StudioError("--adapter / --image-encoder / --reference-mask only matter with --reference-image IMG.")
        self.decor_words = check_settings(self.decor_words, self.decor_strength)


@dataclass
class ResolvedConcept:
    concept: Concept
    source: str
    strength: float
    stages: tuple[float, ...] | None = None  # one strength per denoising stage (staged methods: ProSpect)

    def strength_text(self) -> str:
        """``0.8``, or with stages ``0.8@1,1,0,…`` (stage 0 = the noisiest)."""
        staged = "" if self.stages is None else "@" + ",".join(f"{v:g}" for v in self.stages)
        return f"{self.strength:g}{staged}"


# A concept for one call: (concept, default strength, source), optionally with per-stage strengths.
ConceptEntry = tuple[Concept, float | None, str] | tuple[Concept, float | None, str, StageStrengths | None]


def effective_strengths(prompt: str, negative: str, concepts: Sequence[ConceptEntry]) -> list[ResolvedConcept]:
    """Strength of each concept: the prompt's ``<tok:s>`` > the ``--concept FILE:s`` default > the
    concept's recommended strength > 1.0. Two concepts may not share a trigger. Per-stage strengths
    (``<tok@0-3>``, ``<tok:1,1,0,…>``, or a 4th ``StageStrengths`` item from ``--concept FILE@0-3``)
    need a method with stages (``stage_count``); a strength written in the prompt replaces the whole
    ``--concept`` spec."""
    in_prompt: dict[str, tuple[float | None, StageStrengths | None]] = {}
    for use in find_triggers(prompt) + find_triggers(negative):
        if use.strength is not None or use.stages is not None:
            in_prompt.setdefault(use.token, (use.strength, use.stages))
    seen: dict[str, str] = {}
    out = []
    for concept, default, source, *more in concepts:
        for tok in concept.tokens:
            if tok in seen:
                raise StudioError(f"Concepts {seen[tok]} and {source} share the trigger {tok}; rename one "
                                  "with `python -m studio concepts rename`.")
            seen[tok] = source
        s, spec = in_prompt.get(concept.trigger, (None, more[0] if more else None))
        if s is None:
            s = default if default is not None else (concept.strength if concept.strength is not None else 1.0)
        s = check_strength(float(s), where=source)
        stages = None
        if spec is not None:
            method = get_method(concept.method)
            if not hasattr(method, "stage_count"):
                raise StudioError(f"{concept.trigger} is a {method.name} concept, which has no denoising stages; "
                                  f"per-stage strengths (@0-3, or one value per stage) apply to ProSpect concepts "
                                  f"only — use one strength, e.g. {concept.trigger[:-1]}:0.8>.")
            stages = spec.resolve(method.stage_count(concept), s, where=f"{concept.trigger} ({source})")
            s = max(stages) if spec.values is not None else s
        out.append(ResolvedConcept(concept, source, s, stages))
    return out


def method_options(cfg: GenerateConfig) -> dict[str, dict[str, Any]]:
    """Per-method keyword options of ``apply`` that a request sets (method name → options)."""
    perfusion: dict[str, Any] = {"orthogonal": cfg.perfusion_orthogonal}
    if cfg.perfusion_locking:
        perfusion["locking"] = cfg.perfusion_locking
    return {"perfusion": perfusion, "lora": {"fuse": cfg.fuse_lora}}


@contextlib.contextmanager
def applied(base: Any, resolved: Sequence[ResolvedConcept], notes: list[str] | None = None,
            options: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[dict[str, str]]:
    """Apply every concept, yield ``{trigger: prompt text}``, and remove them all afterwards
    (also on errors), leaving the base bit-identical. ``options``: extra ``apply`` keywords per
    method name (see :func:`method_options`)."""
    handles: list[Any] = []
    try:
        for r in resolved:
            handles.append(_apply(base, r, notes, dict((options or {}).get(r.concept.method, {}))))
        texts: dict[str, str] = {}
        for h in handles:  # a merged concept (Custom Diffusion) names several tokens, each with its text
            texts.update(h.prompt_texts() if hasattr(h, "prompt_texts") else {h.concept.trigger: h.prompt_text()})
        yield texts
    except BaseException:
        # Transactional: a concept that fails to apply (or a failed generation) takes every concept
        # applied before it off again, so the next call sees the plain base.
        _remove_all(handles, quiet=True)
        raise
    _remove_all(handles)


def _apply(base: Any, r: ResolvedConcept, notes: list[str] | None, extra: dict[str, Any]) -> Any:
    """Apply one concept; a failure that is not already a :class:`StudioError` (a damaged file the
    reader let through, a tensor that does not fit the base) becomes one naming the concept. Each
    method's ``apply`` leaves nothing behind when it raises."""
    try:
        if _is_flow(base):  # SD 3 / FLUX: the method's family refusal says more than a key mismatch
            get_method(r.concept.method).check_base(r.concept, base)
        note = check_compatible(r.concept, base, source=r.source)
        if note and notes is not None:
            notes.append(note)
        if r.stages is not None:
            extra["stages"] = r.stages
        return get_method(r.concept.method).apply(base, r.concept, strength=r.strength, **extra)
    except (StudioError, MemoryError, torch.cuda.OutOfMemoryError):
        raise  # the studio's own sentence; running out of memory is not the file's fault
    except Exception as err:  # noqa: BLE001 - reported as one user-facing sentence, chained
        detail = (str(err).splitlines() or [""])[0][:300]
        raise StudioError(f"Concept {r.source} cannot be applied to base {getattr(base, 'name', '?')} "
                          f"({type(err).__name__}: {detail}); the file may be damaged or made for another base.") from err


def _remove_all(handles: Sequence[Any], *, quiet: bool = False) -> None:
    """Remove applied concepts, last first; one failing removal does not stop the others. The first
    failure is raised afterwards (a warning instead when ``quiet``: another error is on its way)."""
    first: BaseException | None = None
    for h in reversed(handles):
        try:
            h.remove()
        except Exception as err:  # noqa: BLE001 - keep removing the others
            first = first or err
    if first is not None:
        if quiet:
            warnings.warn(f"removing a concept failed: {type(first).__name__}: {first}", RuntimeWarning, stacklevel=3)
        else:
            raise first


def a1111_sampler(class_name: str, config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(Sampler, Schedule type)`` as A1111 writes them for a diffusers scheduler class and config, e.g.
    ``("DPM++ 2M", "Karras")`` for ``DPMSolverMultistepScheduler(use_karras_sigmas=True)``. ``None``
    where A1111 has no equivalent (the field is then left out: A1111 would read an unknown sampler name
    as its default) or the schedule is the sampler's own."""
    if class_name == "DPMSolverMultistepScheduler":
        order = int(config.get("solver_order", 2) or 2)
        if str(config.get("algorithm_type", "dpmsolver++")).startswith("sde-"):
            sampler: str | None = ("DPM++ 3M SDE" if order == 3 else
                                   "DPM++ 2M SDE Heun" if config.get("solver_type") == "heun" else "DPM++ 2M SDE")
        else:
            sampler = "DPM++ 2M" if order <= 2 else None  # A1111 has no deterministic third-order multistep
    else:
        sampler = A1111_SAMPLERS.get(class_name)
    schedule = next((label for key, label in A1111_SCHEDULE_TYPES.items() if config.get(key)), None)
    return sampler, (schedule if sampler else None)


def model_hash(base: Any) -> str | None:
    """A1111's "Model hash" of ``base``: the first 10 hex digits of the sha256 of its checkpoint file,
    for a base loaded from one file (hashed once, then remembered: :func:`studio.models.keys.file_sha256`
    and ``base.extra``). ``None`` for folders, hub ids and built-in bases, for which A1111 has no such hash."""
    extra = getattr(base, "extra", None)
    if isinstance(extra, dict) and isinstance(extra.get("sha256"), str):
        return str(extra["sha256"])[:10]
    spec = getattr(base, "spec", "")
    if not str(getattr(base, "identity", "")).startswith("file:") or not isinstance(spec, str):
        return None
    try:
        path = Path(spec).expanduser()
        if not path.is_file():
            return None
        digest = file_sha256(path)
    except OSError:
        return None  # the file moved or became unreadable since loading: no hash rather than a wrong one
    if isinstance(extra, dict):
        extra["sha256"] = digest
    return digest[:10]


def _quote(value: str) -> str:
    """A settings value as A1111 writes one: JSON-quoted when it holds a comma, colon or newline."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def parameters_text(cfg: GenerateConfig, *, seed: int, base: Any, width: int, height: int,
                    resolved: Sequence[ResolvedConcept]) -> str:
    """The A1111-style ``parameters`` PNG text: prompt, negative prompt, then a settings line with A1111's
    field names, order and values (sampler names per :func:`a1111_sampler`, "Model hash" per
    :func:`model_hash`; a field A1111 would misread is left out) and the studio's concepts."""
    if cfg.scheduler != "default":
        cls_name, extra = SCHEDULERS[cfg.scheduler]
        sampler, schedule = a1111_sampler(cls_name, {**base.pipe.scheduler.config, **extra})
    else:
        sampler, schedule = a1111_sampler(type(base.pipe.scheduler).__name__, base.pipe.scheduler.config)
    digest = model_hash(base)
    parts = [f"Steps: {cfg.steps}"]
    parts += [f"Sampler: {sampler}"] if sampler else []
    parts += [f"Schedule type: {schedule}"] if schedule else []
    parts += _guidance_fields(base, cfg.guidance) + [f"Seed: {seed}", f"Size: {width}x{height}"]
    parts += [f"Model hash: {digest}"] if digest else []
    parts += [f"Model: {_quote(str(base.name))}"]
    if resolved:
        parts.append("Concepts: " + json.dumps(", ".join(f"{r.concept.trigger}:{r.strength_text()} ({r.concept.name})"
                                                         for r in resolved)))
    parts += parameters_fields(cfg.decor_words, cfg.decor_strength)
    lines = [cfg.prompt]
    if cfg.negative_prompt:
        lines.append(f"Negative prompt: {cfg.negative_prompt}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def _guidance_fields(base: Any, guidance: float | None) -> list[str]:
    """``CFG scale: 7.5`` (classifier-free guidance); for FLUX.1-dev ``CFG scale: 1, Distilled CFG Scale: 3.5``
    (Forge's fields: true CFG off, the embedded guidance), for FLUX.1-schnell ``CFG scale: 1`` (no guidance)."""
    kind = getattr(base, "guidance_kind", "cfg")
    if kind == "cfg":
        return [f"CFG scale: {guidance:g}"]
    return ["CFG scale: 1"] + ([f"Distilled CFG Scale: {guidance:g}"] if kind == "embedded" else [])


def _flow_checks(base: Any, cfg: GenerateConfig, notes: list[str] | None) -> None:
    """Refuse what the flow families (SD 3 / FLUX) cannot do, each in one sentence; note what they ignore."""
    if not _is_flow(base):
        return
    label = "FLUX.1" if base.family == "flux" else "SD 3"
    if cfg.reference_images:  # FLUX.1 takes them (XLabs-layout adapters); SD 3 is refused in one sentence
        from studio.methods.zeroshot import check_family

        check_family(base)
    if cfg.scheduler != "default":
        raise StudioError(f"--scheduler {cfg.scheduler} is a sampler for noise-prediction bases; {label} is a "
                          "flow-matching model with its own flow Euler sampler, so pass --scheduler default.")
    if cfg.negative_prompt and base.family == "flux":
        raise StudioError("FLUX.1 bases take no negative prompt (the studio keeps true CFG off: --guidance sets "
                          "FLUX.1-dev's embedded guidance); leave --negative-prompt empty.")
    if cfg.decor_words and cfg.decor_strength:
        raise StudioError(f"DECOR projects the UNet's text embeddings, and {label} bases have no UNet; "
                          "leave --decor-words empty or load an SD 1.x, 2.x or SDXL base.")
    if base.guidance_kind == "none" and cfg.guidance and notes is not None:
        notes.append("note: FLUX.1-schnell has no guidance input, so --guidance is ignored.")


def _is_flow(base: Any) -> bool:
    return bool(getattr(base, "is_flow", False))


def _denoiser(base: Any) -> Any:
    """The UNet, or the SD 3 / FLUX transformer."""
    return base.pipe.transformer if _is_flow(base) else base.pipe.unet


def _pipe_kwargs(base: Any, cfg: GenerateConfig, negative: str) -> dict[str, Any]:
    """The guidance arguments of the pipeline call: CFG with a negative prompt (SD 1/2/XL, SD 3), or
    FLUX's embedded guidance with true CFG off (``true_cfg_scale`` stays 1, no negative prompt)."""
    if getattr(base, "family", "") == "flux":
        return {"guidance_scale": cfg.guidance}
    return {"negative_prompt": negative or None, "guidance_scale": cfg.guidance}


def png_info(image: Image.Image) -> PngInfo:
    """The PNG chunks to save ``image`` with (its ``parameters`` and ``studio`` texts)."""
    info = PngInfo()
    for key in ("parameters", "studio"):
        if key in image.info:
            info.add_text(key, image.info[key])
    return info


def _native(base: Any, cfg: GenerateConfig) -> tuple[int, int]:
    width, height = cfg.width or base.native_size, cfg.height or base.native_size
    unet = getattr(base.pipe, "unet", None)
    if unet is None:  # SD 3 / FLUX: the transformer works on 2×2 latent patches
        multiple = int(base.pipe.vae_scale_factor) * 2
    else:
        multiple = int(base.pipe.vae_scale_factor) * 2 ** (len(unet.config.block_out_channels) - 1)
    for name, side in (("width", width), ("height", height)):
        if side % multiple:
            raise StudioError(f"{name} {side} is not a multiple of {multiple}, which base {base.name} needs; "
                              f"try {max(multiple, round(side / multiple) * multiple)}.")
    return width, height


@contextlib.contextmanager
def _scheduler(pipe: Any, name: str) -> Iterator[None]:
    if name == "default":
        yield
        return
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **extra)
    try:
        yield
    finally:
        pipe.scheduler = original


def generate(base: Any, cfg: GenerateConfig, concepts: Sequence[ConceptEntry] = (),
             notes: list[str] | None = None, callback: Any = None) -> list[Image.Image]:
    """Render ``cfg`` on ``base`` (a :class:`~studio.models.BaseModel`) with ``concepts``
    (``(concept, default strength, source)`` triples, already loaded — see ``Studio.generate`` for
    resolving files and library names). Returns ``num_images`` PIL images whose ``info`` holds
    the ``parameters`` text and a ``studio`` JSON of the request."""
    cfg = cfg.resolved(base.profile)
    assert cfg.guidance is not None  # resolved filled it in
    _flow_checks(base, cfg, notes)
    width, height = _native(base, cfg)
    if cfg.reference_images:  # an in-memory zero-shot concept, applied like any other
        from studio.methods.zeroshot import reference_concept

        ref = reference_concept(base, cfg.reference_images, adapter=cfg.adapter, image_encoder=cfg.image_encoder,
                                scale=cfg.reference_scale, mask=cfg.reference_mask)
        concepts = [*concepts, (ref, cfg.reference_scale, "--reference-image")]
    resolved = effective_strengths(cfg.prompt, cfg.negative_prompt, concepts)
    images: list[Image.Image] = []
    from studio.methods.attention import cfg_layout
    from studio.models.speed import unet_speedups, vae_tiling

    with applied(base, resolved, notes, method_options(cfg)) as texts, _scheduler(base.pipe, cfg.scheduler), \
            unet_speedups(_denoiser(base), channels_last=cfg.channels_last, compile=cfg.compile), \
            vae_tiling(base.pipe.vae, cfg.vae_tiling), \
            decor_applied(base.pipe, [rewrite(w, texts) for w in cfg.decor_words], cfg.decor_strength,
                          guided=cfg.guidance > 1), \
            (contextlib.nullcontext() if _is_flow(base) else cfg_layout(base.pipe.unet, guided=cfg.guidance > 1)):
        prompt = rewrite(cfg.prompt, texts)
        negative = rewrite(cfg.negative_prompt, texts)
        for i in range(cfg.num_images):
            seed = cfg.seed + i
            gen = torch.Generator(device="cpu").manual_seed(seed)
            out = base.pipe(prompt=prompt, num_inference_steps=cfg.steps, width=width, height=height,
                            generator=gen, output_type="pil", **_pipe_kwargs(base, cfg, negative))
            img = out.images[0]
            img.info["parameters"] = parameters_text(cfg, seed=seed, base=base, width=width, height=height,
                                                     resolved=resolved)
            request = asdict(cfg) | {"seed": seed, "num_images": 1, "width": width, "height": height,
                                     "base": base.spec, "base_identity": base.identity,
                                     "concepts": [{"source": r.source, "name": r.concept.name,
                                                   "trigger": r.concept.trigger, "strength": r.strength}
                                                  | ({"stages": list(r.stages)} if r.stages is not None else {})
                                                  for r in resolved]}
            img.info["studio"] = json.dumps(request)
            images.append(img)
            if callback is not None:
                callback(i, img)
    return images
