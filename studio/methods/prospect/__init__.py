"""ProSpect concepts: one token embedding per stage of denoising (Zhang et al., SIGGRAPH Asia 2023,
"ProSpect: Prompt Spectrum for Attribute-Aware Personalization of Diffusion Models"; docs/methods.md,
"ProSpect").

The ``T`` training timesteps are split into ``G`` equal stages (10 by default) and the trigger gets a
different input vector ``p_g`` in each — the paper's "prompt spectrum" ``P* = {p_1 … p_G}``. Early,
noisy steps set the layout, late ones the material and fine detail (the paper's §3 analysis), so a
concept can be applied stage by stage: layout from one concept, material from another.

**Stages** (the studio's order, used in files, prompts and the API): **stage 0 is the noisiest**
(the first sampling steps: layout), stage ``G − 1`` the least noisy (the last steps: detail,
material). A UNet call at timestep ``t`` (raw, ``0 ≤ t < T``; non-integer timesteps are binned the
same way) reads stage ``g(t) = G − 1 − ⌊t·G/T⌋`` (:func:`stage_of`). The reference code indexes the
other way round (its index 0 = least noise); files and prompts here never use that order.

**Concept file** (``studio.method = "prospect"``): ``prospect.emb_params`` ``(G, D)`` (SD 1.x / 2.x),
or ``prospect.clip_l`` ``(G, D_l)`` + ``prospect.clip_g`` ``(G, D_g)`` (SDXL) — row ``g`` is stage
``g`` — and the JSON metadata ``prospect.config`` ``{"stages": G, "num_train_timesteps": T,
"format": 1}``. 10 × 768 floats = 30 KB for SD 1.5. The reference code saves its mapper network
and the initializer's embedding instead of the vectors; the studio trains the vectors themselves.

**Strength** per stage ``s_g`` (a single strength is the same at every stage): the stage's vector is
``e_class + s_g·(p_g − e_class)`` with ``e_class`` the class word's input embedding (the mean over its
tokens; zero without a class word), exactly as textual inversion interpolates. ``s_g = 0`` reads the
class word in that stage (exactly, for a one-token class word); every ``s_g = 0`` turns the concept
off — the trigger is rewritten to the class word, so the output is the base's. Prompts write
per-stage strengths as ``<tok@0-3>`` or ``<tok:1,1,0.5,…>`` (:mod:`studio.prompts`).

**Runtime**: the per-timestep text contexts come from NeTI's hook (:mod:`studio.methods.neti.hook`,
one hook per pipeline through the shared attention processor): a ProSpect concept is a
:class:`ProSpectEntry` whose vectors do not depend on the layer, so one context (not one per layer)
is encoded per (timestep, prompt). NeTI and ProSpect tokens in one prompt are encoded in the same
pass. The trigger's fixed row in the token table (what the pooled SDXL embedding and unmatched rows
read) is the mean of the stage vectors at their strengths.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.base import class_word_text
from studio.methods.neti.hook import attach_neti_hook, neti_hook
from studio.methods.runtime import text_encoders, token_table
from studio.prompts import MAX_STAGES, check_strength
from studio.safetensors_io import FLOATS, MIB, Limits, check_values

if TYPE_CHECKING:
    from studio.models import BaseModel

METHOD = "prospect"
CONFIG_KEY = "prospect.config"
SD_KEY = "prospect.emb_params"
SDXL_KEYS = ("prospect.clip_l", "prospect.clip_g")
DEFAULT_STAGES = 10
FORMAT = 1

__all__ = ["ProSpect", "ProSpectEntry", "ProSpectConfig", "stage_of", "tensor_keys", "stage_tables",
           "concept_from_tables", "random_concept", "prospect_config", "class_origins"]


@dataclass(frozen=True)
class ProSpectConfig:
    """The concept's ``prospect.config`` metadata."""

    stages: int = DEFAULT_STAGES  # G
    num_train_timesteps: int = 1000  # T of the base's training schedule: the stages split [0, T)
    format: int = FORMAT

    def __post_init__(self) -> None:
        if not (type(self.stages) is int and type(self.num_train_timesteps) is int and type(self.format) is int):
            raise ConceptFormatError(f"The ProSpect concept's {CONFIG_KEY} needs integer stages, "
                                     "num_train_timesteps and format.")
        if not 1 <= self.stages <= min(MAX_STAGES, self.num_train_timesteps):
            raise ConceptFormatError(f"A ProSpect concept has 1 to {min(MAX_STAGES, self.num_train_timesteps)} "
                                     f"stages; {CONFIG_KEY} says {self.stages}.")
        if self.format > FORMAT:
            raise ConceptFormatError(f"The ProSpect concept's format {self.format} is newer than this studio "
                                     f"reads ({FORMAT}); upgrade the studio.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> ProSpectConfig:
        from studio.safetensors_io import loads_json

        data = loads_json(raw, where=f"The ProSpect concept's {CONFIG_KEY} metadata")
        if not isinstance(data, dict) or "stages" not in data:
            raise ConceptFormatError(f"The ProSpect concept's {CONFIG_KEY} metadata is not a JSON object with "
                                     "'stages'.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def prospect_config(concept: Concept) -> ProSpectConfig:
    raw = concept.meta.get(CONFIG_KEY, "")
    if not raw:
        raise ConceptFormatError(f"ProSpect concept {concept.name or concept.trigger} has no {CONFIG_KEY} metadata.")
    return ProSpectConfig.from_json(raw)


def stage_of(t: torch.Tensor, stages: int, num_train_timesteps: int) -> torch.Tensor:
    """The stage (int64, same shape as ``t``) of raw timesteps ``t``: ``G − 1 − ⌊t·G/T⌋``, clamped to
    ``[0, G − 1]`` — stage 0 holds the noisiest timesteps ``[T − T/G, T)``."""
    bins = torch.floor(t.detach().double() * stages / num_train_timesteps).long()
    return (stages - 1 - bins).clamp(0, stages - 1)


def tensor_keys(n_encoders: int) -> tuple[str, ...]:
    """The tensor names for a base with ``n_encoders`` text encoders."""
    return (SD_KEY,) if n_encoders == 1 else SDXL_KEYS


def stage_tables(concept: Concept) -> list[torch.Tensor]:
    """Per text encoder, the ``(G, D_e)`` stage vectors (row ``g`` = stage ``g``)."""
    keys = SDXL_KEYS if SDXL_KEYS[0] in concept.tensors else (SD_KEY,)
    return [concept.tensors[k] for k in keys]


def concept_from_tables(tables: list[torch.Tensor], *, token: str, class_word: str, name: str = "",
                        num_train_timesteps: int = 1000, base: dict[str, Any] | None = None) -> Concept:
    """A :class:`~studio.concept.Concept` holding ``tables`` (per encoder ``(G, D_e)``; no I/O)."""
    cfg = ProSpectConfig(stages=int(tables[0].shape[0]), num_train_timesteps=int(num_train_timesteps))
    tensors = {k: t.detach().float().cpu().clone() for k, t in zip(tensor_keys(len(tables)), tables)}
    return Concept(method=METHOD, tokens=[token], tensors=tensors, class_word=class_word,
                   name=name or token.strip("<>"), base=dict(base or {}), meta={CONFIG_KEY: cfg.to_json()})


def random_concept(base: BaseModel, trigger: str, seed: int, class_word: str = "cat",
                   stages: int = DEFAULT_STAGES, scale: float = 2.0) -> Concept:
    """An untrained ProSpect concept for ``base``: ``N(0, scale²)`` stage vectors from ``seed`` (tests, demos)."""
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(stages, int(te.config.hidden_size), generator=g) * scale for _, te in text_encoders(base.pipe)]
    steps = int(base.pipe.scheduler.config.get("num_train_timesteps", 1000))
    return concept_from_tables(tables, token=trigger, class_word=class_word, num_train_timesteps=steps,
                               base=base.fingerprint())


def class_origins(pipe: Any, class_word: str, widths: list[int]) -> list[torch.Tensor]:
    """Per encoder, ``e_class`` (D_e,): the class word's mean input embedding, or zeros without one."""
    from studio.methods.textual_inversion import class_embedding

    if not class_word.strip():
        return [torch.zeros(w) for w in widths]
    table = token_table(pipe)
    return [class_embedding(tok, emb, class_word) for tok, emb in zip(table.pristine_tokenizers,
                                                                       table.original_embeddings)]


# -- the hook entry --------------------------------------------------------------------------------
@dataclass
class ProSpectEntry:
    """A ProSpect concept on NeTI's hook (a :class:`~studio.methods.neti.hook.TimestepTokens`): the
    vector of the stage of each timestep, the same at every layer. ``tables``: per encoder ``(G, D_e)``
    (strengths already applied; trainable parameters while training)."""

    trigger: str
    tables: list[torch.Tensor]
    num_train_timesteps: int = 1000

    @property
    def n_layers(self) -> int | None:
        return None  # layer-independent: one context serves every cross-attention layer

    @property
    def stages(self) -> int:
        return int(self.tables[0].shape[0])

    def vectors(self, t: torch.Tensor, layer: torch.Tensor, *, training: bool
                ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per encoder ``(p_{g(t)} (N, D_e), None)`` — no bypass."""
        g = stage_of(t, self.stages, self.num_train_timesteps)
        return [(table[g.to(table.device)], None) for table in self.tables]


# -- the method ------------------------------------------------------------------------------------
@dataclass
class AppliedProSpect:
    concept: Concept
    pipe: Any
    strength: float
    stages: tuple[float, ...]
    table_key: str = ""  # empty when the concept is off (every stage at strength 0)

    def prompt_text(self) -> str:
        return self.concept.trigger if self.table_key else class_word_text(self.concept)

    def remove(self) -> None:
        if not self.table_key:
            return
        hook = neti_hook(self.pipe)
        if hook is not None and self.concept.trigger in hook.entries:
            hook.drop(self.concept.trigger)
        token_table(self.pipe).drop(self.table_key)
        self.table_key = ""


class ProSpect:
    name: ClassVar[str] = METHOD
    importers: ClassVar[tuple] = ()  # the reference code saves a pickled mapper, not vectors: nothing to read
    exporters: ClassVar[dict] = {}
    # The stage vectors would pass for a G-vector textual-inversion embedding in ComfyUI (which takes a
    # file's first tensor): mark the file so embedding loaders skip it (studio.concept.GUARD_TENSOR).
    embedding_guard: ClassVar[bool] = True
    trigger_is_subject: ClassVar[bool] = True  # trained as "a photo of <tok>", like textual inversion
    description: ClassVar[str] = "one token vector per denoising stage, applied stage by stage (ProSpect)"
    # float16/bfloat16/float32; 10 SDXL stage vectors are 80 KB, 1000 stages 8 MB: 64 MiB refuses absurd headers.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=64 * MIB)
    # Input-embedding entries are below 1 and trained vectors stay within a few units (as for textual
    # inversion); 1e4 refuses values that would overflow the fp16 text encoder.
    max_abs: ClassVar[float] = 1e4

    def stage_count(self, concept: Concept) -> int:
        """``G``: how many per-stage strengths the concept takes (stage 0 = the noisiest)."""
        return prospect_config(concept).stages

    def validate(self, concept: Concept) -> None:
        cfg = prospect_config(concept)
        keys = set(concept.tensors)
        if keys not in ({SD_KEY}, set(SDXL_KEYS)):
            raise ConceptFormatError(f"A ProSpect concept holds exactly {SD_KEY!r} or {SDXL_KEYS}; this one holds "
                                     f"{sorted(keys)}.")
        tables = stage_tables(concept)
        if any(t.ndim != 2 or t.shape[0] != cfg.stages or t.shape[1] < 1 for t in tables):
            raise ConceptFormatError(f"ProSpect tensors must be (stages = {cfg.stages}, width); got "
                                     f"{[tuple(t.shape) for t in tables]}.")
        check_values(concept.tensors, f"ProSpect concept {concept.name or concept.trigger}", dtypes=FLOATS,
                     max_abs=self.max_abs)
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError("A ProSpect concept has exactly one trigger token.")

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        from studio.models.families import check_unet_family

        check_unet_family(base, "ProSpect concepts")  # SD 3 / FLUX: one clear sentence
        tables = stage_tables(concept)
        encs = text_encoders(base.pipe)
        label = concept.name or concept.trigger
        if len(tables) != len(encs):
            raise IncompatibleConceptError(
                f"ProSpect concept {label} has vectors for {len(tables)} text encoder(s) but base {base.name} has "
                f"{len(encs)}; SDXL concepts need an SDXL base and SD 1/2 concepts an SD 1/2 base.")
        for t, (_, te) in zip(tables, encs):
            if t.shape[1] != te.config.hidden_size:
                raise IncompatibleConceptError(
                    f"ProSpect concept {label} holds {t.shape[1]}-d vectors but base {base.name}'s text encoder is "
                    f"{te.config.hidden_size}-d; it was made for another model family.")

    def stage_strengths(self, concept: Concept, strength: float,
                        stages: tuple[float, ...] | list[float] | None = None) -> tuple[float, ...]:
        """The ``G`` strengths to apply: ``stages`` as given (checked), else ``strength`` at every stage."""
        n = self.stage_count(concept)
        if stages is None:
            return (check_strength(float(strength)),) * n
        if len(stages) != n:
            raise StudioError(f"ProSpect concept {concept.name or concept.trigger} has {n} stages; got "
                              f"{len(stages)} per-stage strengths.")
        return tuple(check_strength(float(s), where=f"{concept.trigger} stage {i}") for i, s in enumerate(stages))

    def apply(self, base: BaseModel, concept: Concept, *, strength: float,
              stages: tuple[float, ...] | list[float] | None = None) -> AppliedProSpect:
        """Apply at ``strength``, or at one strength per stage (``stages``, ``G`` values, stage 0 = the
        noisiest; see the module doc)."""
        per_stage = self.stage_strengths(concept, strength, stages)
        if not any(per_stage):
            return AppliedProSpect(concept, base.pipe, strength, per_stage)
        self.check_base(concept, base)
        pipe = base.pipe
        cfg = prospect_config(concept)
        widths = [int(te.config.hidden_size) for _, te in text_encoders(pipe)]
        origins = class_origins(pipe, concept.class_word, widths)
        s = torch.tensor(per_stage, dtype=torch.float32)[:, None]  # (G, 1)
        tables = []
        for table, origin in zip(stage_tables(concept), origins):
            table = table.float()
            lerped = origin[None] + s * (table - origin[None])  # textual inversion's interpolation, per stage
            tables.append(torch.where(s == 1, table, lerped).to(base.device))  # exactly p_g at strength 1
        static = [t.mean(0).cpu()[None] for t in tables]  # (1, D_e): the trigger's fixed row
        key = f"prospect:{concept.trigger}"
        table_rows = token_table(pipe)
        existing = neti_hook(pipe)
        if key in table_rows.entries or (existing is not None and concept.trigger in existing.entries):
            raise StudioError(f"ProSpect concept {concept.trigger} is already applied; remove it first.")
        try:
            table_rows.set(key, [concept.trigger], static)
        except ValueError as err:
            raise StudioError(f"Cannot add trigger {concept.trigger!r}: {err}; rename the concept's trigger.") from None
        entry = ProSpectEntry(concept.trigger, tables, cfg.num_train_timesteps)
        try:  # transactional: a failure takes the hook (if it came for this concept) and the token out again
            attach_neti_hook(pipe).add(entry)
        except BaseException:
            installed = neti_hook(pipe)
            if installed is not None:
                installed.entries.pop(concept.trigger, None)
                if not installed.entries:
                    installed.uninstall()
            table_rows.drop(key)
            raise
        return AppliedProSpect(concept, pipe, strength, per_stage, key)
