"""Break-A-Scene concepts (Avrahami et al., "Break-A-Scene: Extracting Multiple Concepts from a Single
Image", SIGGRAPH Asia 2023, arXiv 2305.16311; docs/methods.md, "Break-A-Scene"): one learned token per
concept of a scene, and one LoRA that a run's tokens share.

A file holds its token's embedding and the run's LoRA (the layout: :mod:`studio.methods.break_a_scene.files`).

**Applying.** The token joins the pipeline's token table (as a textual-inversion vector); the LoRA is a
PEFT adapter of the pipeline's LoRA state (:mod:`studio.methods.lora`). The LoRA is keyed by its
**group id** — the hash of its tensors, the same in every file of a run — and applied **once** per
group: a second file of the same run only adds its token, and the LoRA leaves with the group's last
file. With concepts of other methods a file composes as a textual-inversion vector plus a LoRA do.

**Strength** ``s``: the token is ``e_class + s·(e − e_class)`` (``e_class`` the class word's input
embedding, as textual inversion), and the group's LoRA is applied at the largest strength of the group's
applied files (one adapter cannot take two weights). At ``s = 0`` nothing is installed and the trigger
reads as the class word, so the image is the class-word image. The trigger alone names the concept
("a photo of <dog> and <mug>"), as the paper trains it.

SD 3 / FLUX bases are refused: the method is trained through the UNet's cross-attention maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError, StudioError
from studio.methods.base import class_word_text
from studio.methods.break_a_scene.files import (
    EMBEDDINGS,
    EXPORTERS,
    IMPORTERS,
    META_GROUP,
    META_TOKENS,
    METHOD,
    concept_tensors,
    embeddings,
    group_id,
    lora_tensors,
    run_tokens,
)
from studio.methods.lora import LoRA, lora_state
from studio.methods.lora.keys import lora_modules
from studio.methods.runtime import check_embedding_widths, token_table
from studio.methods.textual_inversion import class_embedding, placeholder_tokens
from studio.safetensors_io import FLOATS, GIB, Limits, check_values

if TYPE_CHECKING:
    from studio.models import BaseModel

TABLE_PREFIX = "break_a_scene:"  # token-table key of an applied file: prefix + trigger
ADAPTER_PREFIX = "studio_bas_"  # PEFT adapter name of a group: prefix + group id


@dataclass
class LoraGroup:
    """The applied files of one run: their triggers and strengths, and the shared adapter (loaded at
    ``weight``; 0 = not loaded)."""

    adapter: str
    lora: dict[str, torch.Tensor]
    members: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0


def groups(pipe: Any) -> dict[str, LoraGroup]:
    """The pipeline's applied Break-A-Scene groups by group id (hangs on the pipeline; empty when none)."""
    return getattr(pipe, "_studio_break_a_scene", None) or {}


def _sync(pipe: Any, group: LoraGroup) -> None:
    """Load, re-weight or unload the group's adapter so that its weight is the largest member strength."""
    weight = max(group.members.values(), default=0.0)
    if weight == group.weight:
        return
    state = lora_state(pipe)  # only now: it hangs on the pipeline once made
    if weight == 0.0:
        state.drop(group.adapter)
    elif group.weight == 0.0:
        state.add(group.adapter, group.lora, weight)
    else:  # a public field of the LoRA state, activated as it activates its adapters
        state.weights[group.adapter] = weight
        pipe.set_adapters(list(state.weights), list(state.weights.values()))
    group.weight = weight


def join_group(pipe: Any, lora: dict[str, torch.Tensor], trigger: str, strength: float) -> str:
    """Add ``trigger`` at ``strength`` to the group of ``lora`` (loading its adapter when it is the first);
    returns the group id. Transactional: on failure the group is as it was."""
    gid = group_id(lora)
    registry = getattr(pipe, "_studio_break_a_scene", None)
    if registry is None:
        registry = pipe._studio_break_a_scene = {}
    group = registry.get(gid) or LoraGroup(adapter=ADAPTER_PREFIX + gid, lora=lora)
    registry[gid] = group
    group.members[trigger] = float(strength)
    try:
        _sync(pipe, group)
    except BaseException:
        leave_group(pipe, gid, trigger)
        raise
    return gid


def leave_group(pipe: Any, gid: str, trigger: str) -> None:
    """Take ``trigger`` out of group ``gid``; the adapter leaves with the last member (idempotent)."""
    registry = getattr(pipe, "_studio_break_a_scene", None)
    group = registry.get(gid) if registry else None
    if group is None:
        return
    group.members.pop(trigger, None)
    try:
        _sync(pipe, group)
    finally:
        if not group.members:
            registry.pop(gid, None)  # type: ignore[union-attr]  # registry holds the group
            if not registry:
                del pipe._studio_break_a_scene


@dataclass
class AppliedBreakAScene:
    concept: Concept
    pipe: Any
    strength: float
    key: str | None  # the token-table key; None when off (strength 0) or removed
    group: str | None = None
    vectors: int = 1

    def prompt_text(self) -> str:
        if self.strength == 0:
            return class_word_text(self.concept)
        return " ".join(placeholder_tokens(self.concept.trigger, self.vectors))

    def remove(self) -> None:
        if self.key is None:
            return
        key, self.key = self.key, None
        try:
            if self.group is not None:
                leave_group(self.pipe, self.group, self.concept.trigger)
        finally:
            token_table(self.pipe).drop(key)


class BreakAScene:
    name: ClassVar[str] = METHOD
    trigger_is_subject: ClassVar[bool] = True  # trained as "a photo of <a> and <b>"
    description: ClassVar[str] = ("Break-A-Scene: one token per concept of a scene + the run's shared LoRA "
                                  "(applied once for any number of the run's tokens)")
    # A token embedding among LoRA tensors: mark the files so that embedding loaders skip them.
    embedding_guard: ClassVar[bool] = True
    # Files: float16/bfloat16/float32; the LoRA dominates (megabytes), as LoRA's own cap.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=4 * GIB)
    max_abs: ClassVar[float] = 1e4
    importers: ClassVar[tuple] = IMPORTERS
    exporters: ClassVar[dict] = EXPORTERS

    def validate(self, concept: Concept) -> None:
        label = f"Break-A-Scene concept {concept.name or concept.trigger}"
        tensors = concept.tensors
        lora = lora_tensors(tensors)
        extra = sorted(set(tensors) - set(EMBEDDINGS) - set(lora))
        if EMBEDDINGS[0] not in tensors or extra:
            raise ConceptFormatError(f"{label} must hold {EMBEDDINGS[0]} (+ {EMBEDDINGS[1]} on SDXL) and kohya LoRA "
                                     f"tensors; unexpected {extra[:3] or 'none'}.")
        lora_modules(lora, where=label)  # names, shapes; at least one module
        check_values(tensors, label, dtypes=FLOATS, max_abs=self.max_abs)
        embs = embeddings(concept)
        if any(e.ndim != 2 or min(e.shape) < 1 for e in embs) or len({e.shape[0] for e in embs}) != 1:
            raise ConceptFormatError(f"{label}: embeddings must be (n_vectors, width) with one n for every encoder, "
                                     f"got {[tuple(e.shape) for e in embs]}.")
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError(f"{label} has exactly one trigger token (one file per token of the run).")
        recorded = concept.meta.get(META_GROUP)
        if recorded is not None and recorded != group_id(lora):
            raise ConceptFormatError(f"{label}: its LoRA does not match its {META_GROUP} {recorded!r} (the file was "
                                     "edited); export it again from the run's checkpoint or retrain.")
        if concept.trigger not in run_tokens(concept):
            raise ConceptFormatError(f"{label}: {META_TOKENS} does not list its own trigger {concept.trigger}.")

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        from studio.models.families import check_unet_family

        check_unet_family(base, "Break-A-Scene concepts")  # SD 3 / FLUX: one clear sentence
        label = f"Break-A-Scene concept {concept.name or concept.trigger}"
        check_embedding_widths(label, [int(e.shape[1]) for e in embeddings(concept)], base)
        LoRA().check_base(Concept(method=LoRA.name, tokens=list(concept.tokens), tensors=lora_tensors(concept.tensors),
                                  name=concept.name or concept.trigger), base)

    def apply(self, base: BaseModel, concept: Concept, *, strength: float) -> AppliedBreakAScene:
        """Add the token (scaled by ``strength`` from the class word) and join the run's LoRA group."""
        self.check_base(concept, base)
        pipe = base.pipe
        if strength == 0:  # off: the trigger reads as the class word, nothing is installed
            return AppliedBreakAScene(concept=concept, pipe=pipe, strength=0.0, key=None)
        key = TABLE_PREFIX + concept.trigger
        table = token_table(pipe)
        if key in table.entries:
            raise StudioError(f"Break-A-Scene concept {concept.trigger} is already applied; remove it first.")
        vecs = [e.float() for e in embeddings(concept)]
        n = int(vecs[0].shape[0])
        scaled = []
        for v, tok, emb in zip(vecs, table.pristine_tokenizers, table.original_embeddings):
            if strength != 1:
                start = class_embedding(tok, emb, concept.class_word) if concept.class_word else torch.zeros_like(v[0])
                v = start + strength * (v - start)
            scaled.append(v)
        try:
            table.set(key, placeholder_tokens(concept.trigger, n), scaled)
        except ValueError as err:
            raise StudioError(f"Cannot add trigger {concept.trigger!r}: {err}; rename the concept's trigger.") from None
        try:  # transactional: a LoRA that fails to load takes the token out again
            gid = join_group(pipe, lora_tensors(concept.tensors), concept.trigger, strength)
        except BaseException:
            table.drop(key)
            raise
        return AppliedBreakAScene(concept=concept, pipe=pipe, strength=float(strength), key=key, group=gid, vectors=n)


__all__ = ["EMBEDDINGS", "META_GROUP", "META_TOKENS", "METHOD", "AppliedBreakAScene", "BreakAScene", "LoraGroup",
           "concept_tensors", "embeddings", "group_id", "groups", "join_group", "leave_group", "lora_tensors",
           "run_tokens"]
