"""NeTI concepts: a neural space-time mapper gives the concept token a different embedding per
denoising timestep and per UNet cross-attention layer (Alaluf et al. 2023; docs/methods.md §5).

* :mod:`~studio.methods.neti.mapper` — ``M(t, ℓ) → (token, bypass)``: Fourier features (buffer),
  anchor-initialised first layer, nested dropout, output scaled to the class word's norm;
* :mod:`~studio.methods.neti.encoder` — the CLIP pass with per-row token vectors and the textual
  bypass before the final LayerNorm;
* :mod:`~studio.methods.neti.hook` — per-layer, per-timestep contexts through the shared
  cross-attention processor (one batched encoder pass for all layers, cached per timestep at
  inference, only conditional CFG rows edited).

**Concept file** (``studio.method = "neti"``): the mapper's ``state_dict`` as tensors named
``neti.<name>`` (``neti.w`` is the Fourier-feature buffer), and its :class:`MapperConfig` as JSON in
the metadata key ``neti.config`` (widths, the UNet's layer list, class-word norms, σ's, bypass
default …). ≈ 566k floats ≈ 2.3 MB for SD 1.x (16 layers, 768-d).

**Strength** ``s`` → truncation (:func:`truncation_for`): ``s ≥ 1`` keeps all ``H = 128`` hidden
dimensions (as trained); ``0 < s < 1`` keeps ``round(H^s)`` (fewer = more editable, less faithful);
``s = 0`` is off — the trigger is rewritten to the class word, as for textual inversion.
**Bypass**: on or off per concept (``neti.config`` ``bypass``, see :func:`with_bypass`), or per
application (``NeTI().apply(…, bypass=False)``).

SDXL (two encoders, 70 cross-attention layers): one mapper emits a ``(token, bypass)`` pair per
encoder (``2·(768 + 1280)`` outputs), the contexts are each encoder's penultimate states (what the
SDXL UNet reads) with the bypass added to them, and the pooled ``text_embeds`` — one vector per
prompt, not per layer — see the placeholder's fixed row: the mapper's mean token over the anchors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.attention import unet_layers
from studio.methods.base import class_word_text
from studio.methods.neti.hook import NetiEntry, NetiHook, attach_neti_hook, neti_hook
from studio.methods.neti.mapper import MapperConfig, NetiMapper, truncation_for
from studio.methods.runtime import text_encoders, token_table
from studio.safetensors_io import FLOATS, MIB, Limits, check_values

if TYPE_CHECKING:
    from studio.models import BaseModel

METHOD = "neti"
TENSOR_PREFIX = "neti."
CONFIG_KEY = "neti.config"

__all__ = ["NeTI", "MapperConfig", "NetiMapper", "NetiHook", "NetiEntry", "neti_hook", "attach_neti_hook",
           "truncation_for", "mapper_config_for", "mapper_config", "mapper_from_concept", "concept_from_mapper",
           "random_concept", "with_bypass", "class_norms"]


# -- concept <-> mapper ----------------------------------------------------------------------------
def class_norms(pipe: Any, class_word: str) -> tuple[float, ...]:
    """``‖E(class word)‖`` per text encoder (mean input embedding over the word's tokens)."""
    from studio.methods.textual_inversion import class_embedding

    if not class_word.strip():
        raise StudioError("NeTI scales its tokens to the class word's embedding norm: give a class word such as 'dog'.")
    table = token_table(pipe)
    return tuple(float(class_embedding(tok, emb, class_word).norm())
                 for tok, emb in zip(table.pristine_tokenizers, table.original_embeddings))


def mapper_config_for(pipe: Any, class_word: str, **settings: Any) -> MapperConfig:
    """A :class:`MapperConfig` fitted to ``pipe``: its encoders' widths, its UNet's cross-attention
    layers in execution order, the class word's norms; ``settings`` override the other fields."""
    widths = tuple(int(te.config.hidden_size) for _, te in text_encoders(pipe))
    layers = tuple(layer.name for layer in unet_layers(pipe.unet))
    steps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    return MapperConfig(widths=widths, layers=layers, class_norms=class_norms(pipe, class_word),
                        num_train_timesteps=steps, **settings)


def mapper_config(concept: Concept) -> MapperConfig:
    raw = concept.meta.get(CONFIG_KEY, "")
    if not raw:
        raise ConceptFormatError(f"NeTI concept {concept.name or concept.trigger} has no {CONFIG_KEY} metadata.")
    return MapperConfig.from_json(raw)


def mapper_from_concept(concept: Concept, device: torch.device | str | None = None) -> NetiMapper:
    """The concept's mapper (float32, on ``device``), Fourier buffer included."""
    cfg = mapper_config(concept)
    mapper = NetiMapper(cfg)
    state = {k[len(TENSOR_PREFIX):]: v.float() for k, v in concept.tensors.items() if k.startswith(TENSOR_PREFIX)}
    mapper.load_state_dict(state, strict=True)
    return mapper.to(device or "cpu")


def concept_from_mapper(mapper: NetiMapper, *, token: str, class_word: str, name: str = "",
                        base: dict[str, Any] | None = None) -> Concept:
    """A :class:`~studio.concept.Concept` holding ``mapper`` (no I/O)."""
    tensors = {TENSOR_PREFIX + k: v.detach().float().cpu().clone() for k, v in mapper.state_dict().items()}
    return Concept(method=METHOD, tokens=[token], tensors=tensors, class_word=class_word,
                   name=name or token.strip("<>"), base=dict(base or {}), meta={CONFIG_KEY: mapper.cfg.to_json()})


def random_concept(base: BaseModel, trigger: str, seed: int, class_word: str = "cat", **settings: Any) -> Concept:
    """An untrained NeTI concept for ``base`` (weights drawn from ``seed``): tests and demos."""
    cfg = mapper_config_for(base.pipe, class_word, **settings)
    mapper = NetiMapper(cfg, generator=torch.Generator().manual_seed(seed))
    return concept_from_mapper(mapper, token=trigger, class_word=class_word, base=base.fingerprint())


def with_bypass(concept: Concept, on: bool) -> Concept:
    """A copy of ``concept`` whose default is the textual bypass ``on`` / off."""
    cfg = dataclasses.replace(mapper_config(concept), bypass=bool(on))
    return dataclasses.replace(concept, meta=dict(concept.meta) | {CONFIG_KEY: cfg.to_json()})


# -- the method ------------------------------------------------------------------------------------
@dataclass
class AppliedNeTI:
    concept: Concept
    pipe: Any
    strength: float
    table_key: str = ""  # empty when the concept is off (strength 0)

    def prompt_text(self) -> str:
        return self.concept.trigger if self.table_key else class_word_text(self.concept)

    def remove(self) -> None:
        if not self.table_key:
            return
        hook = neti_hook(self.pipe)
        if hook is not None:
            hook.drop(self.concept.trigger)
        token_table(self.pipe).drop(self.table_key)
        self.table_key = ""


class NeTI:
    name: ClassVar[str] = METHOD
    importers: ClassVar[tuple] = ()  # no other tool writes this method's files
    exporters: ClassVar[dict] = {}
    # Its files are no embedding, yet ComfyUI would load their first tensor as one: mark them
    # (studio.concept.GUARD_TENSOR) so embedding loaders skip them.
    embedding_guard: ClassVar[bool] = True
    trigger_is_subject: ClassVar[bool] = True  # trained as "a photo of <tok>"
    description: ClassVar[str] = "a neural space-time mapper: one token per timestep and UNet layer (NeTI)"
    # Files: float16/bfloat16/float32; an SD 1.x mapper is 2.3 MB and an SDXL one ~8 MB, so 256 MiB
    # refuses absurd headers before any allocation.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=256 * MIB)
    # Mapper weights are O(1) and the Fourier buffer is N(0, σ²) with σ ≤ 2 (|w| < 20); 1e4 refuses
    # values that would overflow the fp16 text encoder.
    max_abs: ClassVar[float] = 1e4

    def validate(self, concept: Concept) -> None:
        cfg = mapper_config(concept)
        want = {TENSOR_PREFIX + k: v for k, v in cfg.tensor_shapes().items()}
        have = {k: tuple(v.shape) for k, v in concept.tensors.items()}
        if set(have) != set(want):
            raise ConceptFormatError(f"A NeTI concept holds the mapper tensors {sorted(want)}; this one lacks "
                                     f"{sorted(set(want) - set(have))} and has extra {sorted(set(have) - set(want))}.")
        wrong = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if wrong:
            raise ConceptFormatError(f"NeTI tensors do not fit their neti.config (have, want): {wrong}.")
        check_values(concept.tensors, f"NeTI concept {concept.name or concept.trigger}", dtypes=FLOATS,
                     max_abs=self.max_abs)
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError("A NeTI concept has exactly one trigger token.")

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        from studio.models.families import check_unet_family

        check_unet_family(base, "NeTI concepts")  # SD 3 / FLUX: one clear sentence
        cfg = mapper_config(concept)
        label = concept.name or concept.trigger
        widths = [int(te.config.hidden_size) for _, te in text_encoders(base.pipe)]
        if list(cfg.widths) != widths:
            raise IncompatibleConceptError(
                f"NeTI concept {label} was made for text encoder width(s) {list(cfg.widths)} but base {base.name} "
                f"has {widths}; load a base of the family it was trained on.")
        layers = [layer.name for layer in unet_layers(base.pipe.unet)]
        if list(cfg.layers) != layers:
            raise IncompatibleConceptError(
                f"NeTI concept {label} maps {cfg.n_layers} cross-attention layers but base {base.name}'s UNet has "
                f"{len(layers)} (or names them differently); load a base of the family it was trained on.")

    def apply(self, base: BaseModel, concept: Concept, *, strength: float, bypass: bool | None = None) -> AppliedNeTI:
        """Apply at ``strength`` (see the module doc); ``bypass`` overrides the concept's default."""
        if strength == 0:
            return AppliedNeTI(concept, base.pipe, strength)
        self.check_base(concept, base)
        pipe = base.pipe
        mapper = mapper_from_concept(concept, device=base.device).eval().requires_grad_(False)
        truncation = truncation_for(strength, mapper.cfg.hidden)
        with torch.no_grad():
            static = [v.cpu()[None] for v in mapper.static_tokens(truncation)]  # (1, D_e) per encoder
        key = f"neti:{concept.trigger}"
        table = token_table(pipe)
        existing = neti_hook(pipe)
        if key in table.entries or (existing is not None and concept.trigger in existing.entries):
            raise StudioError(f"NeTI concept {concept.trigger} is already applied; remove it first.")
        try:
            table.set(key, [concept.trigger], static)
        except ValueError as err:
            raise StudioError(f"Cannot add trigger {concept.trigger!r}: {err}; rename the concept's trigger.") from None
        entry = NetiEntry(concept.trigger, mapper, truncation, mapper.cfg.bypass if bypass is None else bool(bypass))
        try:  # transactional: a failure below takes the hook (if it came for this concept) and the token out
            hook = attach_neti_hook(pipe)
            hook.add(entry)
        except BaseException as err:
            installed = neti_hook(pipe)
            if installed is not None:
                installed.entries.pop(concept.trigger, None)
                if not installed.entries:
                    installed.uninstall()
            table.drop(key)
            if isinstance(err, ValueError):
                raise IncompatibleConceptError(f"NeTI concept {concept.name or concept.trigger}: {err}.") from None
            raise
        return AppliedNeTI(concept, pipe, strength, key)
