"""Textual inversion concepts: extra token rows spliced into the text encoder(s).

Tensors (the A1111 / ComfyUI / InvokeAI convention, also read by diffusers'
``load_textual_inversion(file, token=…)``):

* SD 1.x / 2.x: ``emb_params`` — ``(n, D)`` for ``n`` vectors;
* SDXL: ``clip_l`` ``(n, 768-ish)`` for the first encoder and ``clip_g`` ``(n, 1280-ish)`` for the second.

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
from studio.methods.registry import register_method
from studio.methods.runtime import text_encoders, token_table

if TYPE_CHECKING:
    from studio.concept import Concept
    from studio.models import BaseModel

SD_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")


def tensor_keys(n_encoders: int) -> tuple[str, ...]:
    return (SD_KEY,) if n_encoders == 1 else SDXL_KEYS


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
    keys = SDXL_KEYS if SDXL_KEYS[0] in concept.tensors else (SD_KEY,)
    return [concept.tensors[k] for k in keys]


@register_method
class TextualInversion:
    name: ClassVar[str] = "textual_inversion"
    trigger_is_subject: ClassVar[bool] = True  # trained as "a photo of <tok>"
    description: ClassVar[str] = "a few learned token vectors (A1111/diffusers-compatible)"

    def validate(self, concept: Concept) -> None:
        keys = set(concept.tensors)
        if keys not in ({SD_KEY}, set(SDXL_KEYS)):
            raise ConceptFormatError(f"A textual-inversion concept holds exactly {SD_KEY!r} or {SDXL_KEYS}; "
                                     f"this one holds {sorted(keys)}.")
        vecs = _vectors(concept)
        if any(v.ndim != 2 or v.shape[0] < 1 for v in vecs) or len({v.shape[0] for v in vecs}) != 1:
            raise ConceptFormatError("Textual-inversion tensors must be (n_vectors, width) with one n for "
                                     f"every encoder; got {[tuple(v.shape) for v in vecs]}.")
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


# -- import / export ---------------------------------------------------------------------------
def _ti_concept(vectors: dict[str, torch.Tensor], token: str, source: str) -> Concept:
    from studio.concept import Concept
    from studio.prompts import normalize_token

    family = "sdxl" if SDXL_KEYS[0] in vectors else {768: "sd1", 1024: "sd2"}.get(vectors[SD_KEY].shape[1], "")
    return Concept(method=TextualInversion.name, tokens=[normalize_token(token)],
                   tensors={k: v.detach().float().reshape(-1, v.shape[-1]).contiguous() for k, v in vectors.items()},
                   name=token.strip("<>"), base={"family": family} if family else {})


def _token_from_name(path) -> str:
    import re

    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", path.stem).strip("-.") or "concept"
    return f"<{stem}>"


def _import_ti(tensors: dict, md: dict, path) -> Concept | None:
    """A1111 ``emb_params`` / ``string_to_param``, SDXL ``clip_l``+``clip_g``, diffusers
    ``{token: (n, d)}`` and Cross-Initialization's ``{token}_v0, {token}_v1 …``."""
    import re

    if set(tensors) == {SD_KEY} or set(tensors) == set(SDXL_KEYS):
        return _ti_concept(dict(tensors), _token_from_name(path), str(path))
    if "string_to_param" in tensors:  # A1111 .pt
        params = tensors["string_to_param"]
        vec = params.get("*") if isinstance(params, dict) else None
        if vec is None and isinstance(params, dict) and params:
            vec = next(iter(params.values()))
        if not isinstance(vec, torch.Tensor):
            raise ConceptFormatError(f"{path.name}: an A1111 embedding without vectors in string_to_param.")
        name = tensors.get("name") if isinstance(tensors.get("name"), str) else path.stem
        return _ti_concept({SD_KEY: vec}, f"<{name}>", str(path))
    if tensors and all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) for v in tensors.values()):
        groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for k, v in tensors.items():
            m = re.fullmatch(r"(.+)_v(\d+)", k)
            base, idx = (m.group(1), int(m.group(2))) if m else (k, 0)
            groups.setdefault(base, []).append((idx, v.reshape(-1, v.shape[-1])))
        if len(groups) == 1:
            token, parts = next(iter(groups.items()))
            vec = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])], dim=0)
            return _ti_concept({SD_KEY: vec}, token if token.startswith("<") else f"<{token}>", str(path))
    return None


def _export_diffusers(concept: Concept, out) -> object:
    """diffusers ``learned_embeds.safetensors``: ``{token: (n, d)}`` (SDXL: a folder-less pair is
    not a diffusers convention, so SDXL exports the A1111 ``clip_l``/``clip_g`` file)."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    tensors = ({concept.trigger: concept.tensors[SD_KEY]} if SD_KEY in concept.tensors
               else {k: concept.tensors[k] for k in SDXL_KEYS})
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return out


def _export_a1111(concept: Concept, out) -> object:
    """A1111 / ComfyUI safetensors: the tensors alone (``emb_params`` or ``clip_l``/``clip_g``)."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in concept.tensors.items()}, str(tmp),
                  metadata={"modelspec.trigger_phrase": concept.trigger})
    return out


def _register_io() -> None:
    from studio.interop import register_exporter, register_importer

    register_importer(_import_ti)
    register_exporter(TextualInversion.name, "diffusers")(_export_diffusers)
    register_exporter(TextualInversion.name, "a1111")(_export_a1111)


_register_io()
