"""Textual inversion concepts: extra token rows spliced into the text encoder(s).

Tensors (the A1111 / ComfyUI / InvokeAI convention, also read by diffusers'
``load_textual_inversion(file, token=…)``):

* SD 1.x / 2.x: ``emb_params`` — ``(n, D)`` for ``n`` vectors;
* SDXL and SD 3 / 3.5: ``clip_l`` ``(n, 768-ish)`` for the first encoder and ``clip_g`` ``(n, 1280-ish)`` for
  the second (SD 3's T5 reads the trigger as plain text);
* FLUX.1: ``clip_l`` alone (the key of diffusers' advanced FLUX script; T5 is not trained).

The trigger ``<tok>`` becomes ``n`` added tokens ``<tok> <tok>#1 … <tok>#{n-1}``. (Not diffusers'
``<tok>_1`` naming: its pipelines expand a prompt's ``<tok>`` into ``<tok> <tok>_1 …`` with a plain
string replace that would also rewrite the ``<tok>`` inside an already expanded ``<tok>_1``. The
names never reach a file, so files stay loadable by ``load_textual_inversion(file, token=…)``.)

**Strength** ``s``: every vector is ``e_class + s·(e − e_class)`` where ``e_class`` is the input
embedding of the class word (mean over its tokens); at ``s = 0`` the trigger is rewritten to the
class word itself, so the output is exactly the class-word image. Without a class word the
interpolation starts from zero and ``s = 0`` drops the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.base import class_word_text
from studio.methods.runtime import text_encoders, token_table
from studio.methods.textual_inversion.files import (  # noqa: F401 (public)
    EXPORTERS,
    FLUX_KEYS,
    IMPORTERS,
    KEY_SETS,
    METHOD,
    SD_KEY,
    SDXL_KEYS,
    concept_keys,
    tensor_keys,
)
from studio.safetensors_io import FLOATS, MIB, Limits, check_values

if TYPE_CHECKING:
    from studio.concept import Concept
    from studio.models import BaseModel



def placeholder_tokens(trigger: str, n: int) -> list[str]:
    """``<tok>``, ``<tok>#1`` … — the added tokens that carry ``n`` vectors."""
    return [trigger] + [f"{trigger}#{i}" for i in range(1, n)]


def class_embedding(tokenizer, embedding: torch.nn.Module, word: str) -> torch.Tensor:
    """Mean input embedding ``(D,)`` of the tokens of ``word`` (no BOS/EOS)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise StudioError(f"The class word {word!r} has no tokens; pass a real word such as 'dog'.")
    with torch.no_grad():
        rows = embedding(torch.tensor(ids, device=_device_of(embedding)))
    return rows.float().mean(0).cpu()


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(iter(module.parameters())).device if any(True for _ in module.parameters()) else torch.device("cpu")


@dataclass
class AppliedTI:
    concept: Concept
    pipe: object
    strength: float
    key: str

    def prompt_text(self) -> str:
        if self.strength == 0:
            return class_word_text(self.concept)
        n = _vectors(self.concept)[0].shape[0]
        return " ".join(placeholder_tokens(self.concept.trigger, n))

    def remove(self) -> None:
        token_table(self.pipe).drop(self.key)


def _vectors(concept: Concept) -> list[torch.Tensor]:
    return [concept.tensors[k] for k in concept_keys(concept.tensors)]


class TextualInversion:
    name: ClassVar[str] = METHOD
    importers: ClassVar[tuple] = IMPORTERS
    exporters: ClassVar[dict] = EXPORTERS
    trigger_is_subject: ClassVar[bool] = True  # trained as "a photo of <tok>"
    description: ClassVar[str] = "a few learned token vectors (A1111/diffusers-compatible)"
    # Files: float16/bfloat16/float32 only. A few vectors (SDXL, 75 vectors: 0.6 MB) plus the
    # optional ref.* photo embeddings (hundreds of photos × 1024 floats): 64 MiB is far above any real
    # file and refuses a header that claims a huge tensor before anything is allocated.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=64 * MIB)
    # Input embeddings have per-element magnitudes below 1 and trained vectors stay within a few
    # units; 1e4 refuses values that saturate the text encoder (fp16 overflow, black images).
    max_abs: ClassVar[float] = 1e4

    def validate(self, concept: Concept) -> None:
        keys = set(concept.tensors)
        if keys not in KEY_SETS:
            raise ConceptFormatError(f"A textual-inversion concept holds exactly {SD_KEY!r}, {SDXL_KEYS} or "
                                     f"{FLUX_KEYS}; "
                                     f"this one holds {sorted(keys)}.")
        vecs = _vectors(concept)
        if any(v.ndim != 2 or min(v.shape) < 1 for v in vecs) or len({v.shape[0] for v in vecs}) != 1:
            raise ConceptFormatError("Textual-inversion tensors must be (n_vectors, width) with one n for "
                                     f"every encoder; got {[tuple(v.shape) for v in vecs]}.")
        check_values(concept.tensors, "Textual-inversion concept", dtypes=FLOATS, max_abs=self.max_abs)
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError("A textual-inversion concept has exactly one trigger token.")

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        vecs = _vectors(concept)
        encs = text_encoders(base.pipe)
        if len(vecs) != len(encs):
            raise IncompatibleConceptError(
                f"Concept {concept.name} has embeddings for {len(vecs)} text encoder(s) but base {base.name} "
                f"has {len(encs)}; SDXL concepts need an SDXL base and SD 1/2 concepts an SD 1/2 base.")
        for v, (_, te) in zip(vecs, encs):
            if v.shape[1] != te.config.hidden_size:
                raise IncompatibleConceptError(
                    f"Concept {concept.name} holds {v.shape[1]}-d embeddings but base {base.name}'s text encoder is "
                    f"{te.config.hidden_size}-d; it was made for another model family.")

    def apply(self, base: BaseModel, concept: Concept, *, strength: float) -> AppliedTI:
        self.check_base(concept, base)
        pipe = base.pipe
        vecs = _vectors(concept)
        n = vecs[0].shape[0]
        table = token_table(pipe)
        scaled = []
        for v, (tok, emb) in zip(vecs, zip(table.pristine_tokenizers, table.original_embeddings)):
            v = v.float()
            if strength != 1:
                start = class_embedding(tok, emb, concept.class_word) if concept.class_word else torch.zeros_like(v[0])
                v = start + strength * (v - start)
            scaled.append(v)
        key = f"ti:{concept.trigger}"
        try:
            table.set(key, placeholder_tokens(concept.trigger, n), scaled)
        except ValueError as err:
            raise StudioError(f"Cannot add trigger {concept.trigger!r}: {err}; rename the concept's trigger.") from None
        return AppliedTI(concept=concept, pipe=pipe, strength=strength, key=key)
