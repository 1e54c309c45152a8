"""Custom Diffusion concepts: a modifier token and the trained cross-attention K/V projections
(Kumari et al., "Multi-Concept Customization of Text-to-Image Diffusion", CVPR 2023, arXiv 2212.04488;
docs/methods.md, "Custom Diffusion").

The paper fine-tunes only ``W_k`` and ``W_v`` of every cross-attention layer — the two matrices that
read the text — plus the input embedding of a new modifier token ``V*`` placed before the class noun
("photo of a V* cat"). A concept holds:

==============================================================  ================================================
``<layer>.processor.to_k_custom_diffusion.weight``               the trained ``W_k`` of cross-attention ``layer``, ``(inner, D)``
``<layer>.processor.to_v_custom_diffusion.weight``               the trained ``W_v``, ``(inner, D)``
``custom_diffusion.embedding``                                   the modifier token(s)' input embedding, ``(n, D_in)``
``custom_diffusion.embedding_2``                                 SDXL only: in the second encoder, ``(n, D_in2)``
==============================================================  ================================================

``<layer>`` is the module path of the layer in the UNet (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``):
layers are matched by name and width, never by count or order. The K/V names are diffusers' own
(``save_attn_procs``), so the ``diffusers`` export only adds what its loader needs beside them.

**Full weights, applied as deltas.** The file stores the *trained* matrices — what the paper and
diffusers' loader store — so a file is complete without its base (export and import need no model).
Applying computes ``ΔW = W − W₀`` from the loaded base's own ``to_k``/``to_v`` (the weight under a
PEFT wrapper, so a LoRA applied before does not leak into ``ΔW``) and the shared attention processor
adds ``s · ctx ΔWᵀ`` (:mod:`studio.methods.custom_diffusion.hook`). On the base it was trained on,
strength 1 is exactly the trained model; on another fine-tune of the same architecture it replaces
that model's K/V by the trained ones, as diffusers' loader does (generation notes the different
identity).

**Strength** ``s`` scales ``ΔW``: ``W₀ + s·ΔW`` — 0 = the base, 1 = as trained, up to 2. At ``s = 0``
nothing is installed and the trigger reads as the class word, so the image is the class-word image;
for ``s > 0`` the token keeps its trained embedding (only the K/V change fades), so small strengths read
as "V* cat" through the base's K/V rather than as "cat".

**Prompt text.** The trigger is the modifier, followed by the class noun (``<new1> cat``), as the
paper trains it; ``trigger_is_subject`` is False, as for DreamBooth. A concept merged from several
(:mod:`studio.methods.custom_diffusion.merge`) holds one token per source concept and their class
nouns (``custom_diffusion.class_words``, a JSON list); :meth:`AppliedCustomDiffusion.prompt_texts`
gives the text of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.attention import add_hook, remove_hook, store_of, unet_layers
from studio.methods.custom_diffusion.files import (
    EMBEDDINGS,
    EXPORTERS,
    IMPORTERS,
    K_NAME,
    META_CLASS_WORDS,
    METHOD,
    V_NAME,
    class_words,
    concept_embeddings,
    kv_layers,
)
from studio.methods.custom_diffusion.hook import HOOK_PREFIX, CustomDiffusionHook, base_weight
from studio.methods.runtime import check_embedding_widths, token_table
from studio.safetensors_io import FLOATS, GIB, Limits, check_values

if TYPE_CHECKING:
    from studio.concept import Concept
    from studio.models import BaseModel

def concept_tensors(kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    embeddings: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named tensors of a concept (CPU float32, contiguous): ``kv[layer] = (W_k, W_v)`` and the
    token embeddings ``(n, D_in)`` per encoder."""
    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", torch.float32).contiguous().clone()

    out: dict[str, torch.Tensor] = {}
    for name, (wk, wv) in kv.items():
        out[K_NAME.format(name)], out[V_NAME.format(name)] = t(wk), t(wv)
    out.update({k: t(e.reshape(-1, e.shape[-1])) for k, e in zip(EMBEDDINGS, embeddings)})
    return out


@dataclass
class AppliedCustomDiffusion:
    concept: Concept
    pipe: Any
    strength: float
    key: str | None  # None when the concept is off (strength 0)
    words: list[str] = field(default_factory=list)

    def prompt_text(self) -> str:
        return self.prompt_texts()[self.concept.trigger]

    def prompt_texts(self) -> dict[str, str]:
        """The text of every token of the concept (a merged concept has several): ``"<tok> class"``,
        or the class word alone at strength 0."""
        if self.key is None:
            return {tok: word for tok, word in zip(self.concept.tokens, self.words)}
        return {tok: f"{tok} {word}".strip() for tok, word in zip(self.concept.tokens, self.words)}

    def remove(self) -> None:
        if self.key is None:
            return
        remove_hook(self.pipe.unet, self.key)
        token_table(self.pipe).drop(self.key)
        self.key = None


class CustomDiffusion:
    name: ClassVar[str] = METHOD
    trigger_is_subject: ClassVar[bool] = False  # "photo of a <new1> cat": the modifier goes with the class noun
    description: ClassVar[str] = ("Custom Diffusion: a modifier token + trained cross-attention K/V "
                                  "(diffusers-compatible; several concepts merge in closed form)")
    # Its files hold a token embedding among many other tensors; mark them so embedding loaders skip them.
    embedding_guard: ClassVar[bool] = True
    # Files: float16/bfloat16/float32. Full K/V of every cross-attention layer: 77 MB on SD 1.5 and
    # 1.4 GB on SDXL in float32 — so 4 GiB, refused from the header before anything is allocated.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=4 * GIB)
    # Projection weights are O(0.01–1) and embeddings below 1; 1e4 refuses values that overflow an fp16 UNet.
    max_abs: ClassVar[float] = 1e4
    importers: ClassVar[tuple] = IMPORTERS
    exporters: ClassVar[dict] = EXPORTERS

    def validate(self, concept: Concept) -> None:
        label = f"Custom Diffusion concept {concept.name or concept.trigger}"
        tensors = concept.tensors
        kv = kv_layers(tensors)
        extra = sorted(set(tensors) - set(EMBEDDINGS) - {K_NAME.format(n) for n in kv} - {V_NAME.format(n) for n in kv})
        if not kv or EMBEDDINGS[0] not in tensors or extra:
            raise ConceptFormatError(f"{label} must hold {EMBEDDINGS[0]} and <layer>.processor.to_k/to_v_custom_diffusion"
                                     f".weight tensors; layers {len(kv)}, unexpected {extra[:3] or 'none'}.")
        check_values(tensors, label, dtypes=FLOATS, max_abs=self.max_abs)
        widths = set()
        for name, (wk, wv) in kv.items():
            if wk.ndim != 2 or wk.shape != wv.shape or min(wk.shape) < 1:
                raise ConceptFormatError(f"{label}: layer {name} needs to_k and to_v weights of one (inner, D) shape, "
                                         f"got {tuple(wk.shape)} and {tuple(wv.shape)}.")
            widths.add(int(wk.shape[1]))
        if len(widths) != 1:
            raise ConceptFormatError(f"{label}: the layers read text contexts of different widths {sorted(widths)}.")
        embs = concept_embeddings(concept)
        if any(e.ndim != 2 or min(e.shape) < 1 for e in embs) or len({e.shape[0] for e in embs}) != 1:
            raise ConceptFormatError(f"{label}: embeddings must be (n_tokens, width) with one n for every encoder, "
                                     f"got {[tuple(e.shape) for e in embs]}.")
        if not concept.tokens or not all(concept.tokens) or len(set(concept.tokens)) != len(concept.tokens):
            raise ConceptFormatError(f"{label} needs distinct trigger tokens, got {concept.tokens}.")
        if embs[0].shape[0] != len(concept.tokens):
            raise ConceptFormatError(f"{label} holds {embs[0].shape[0]} token embedding(s) for {len(concept.tokens)} "
                                     "trigger(s); it needs one per trigger.")
        class_words(concept)

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        from studio.models.families import check_unet_family

        check_unet_family(base, "Custom Diffusion concepts")  # SD 3 / FLUX: one clear sentence
        from studio.models.families import check_unet_family

        check_unet_family(base, "Custom Diffusion concepts")  # SD 3 / FLUX have no cross-attention K/V
        label = f"Custom Diffusion concept {concept.name or concept.trigger}"
        layers = {layer.name: layer for layer in unet_layers(base.pipe.unet)}
        for name, (wk, _) in kv_layers(concept.tensors).items():
            layer = layers.get(name)
            if layer is None:
                raise IncompatibleConceptError(f"{label} trained layer {name}, which base {base.name} does not have "
                                               "among its cross-attention layers; it was made for another architecture.")
            if tuple(wk.shape) != (layer.inner_dim, layer.context_dim):
                raise IncompatibleConceptError(
                    f"{label}: layer {name} is {layer.context_dim}→{layer.inner_dim} in base {base.name} but the concept's "
                    f"is {wk.shape[1]}→{wk.shape[0]}; it was made for another model family.")
        check_embedding_widths(label, [int(e.shape[1]) for e in concept_embeddings(concept)], base)

    def apply(self, base: BaseModel, concept: Concept, *, strength: float) -> AppliedCustomDiffusion:
        """Add the tokens and hook ``W₀ + s·ΔW`` into every trained layer (module doc)."""
        self.check_base(concept, base)
        words = class_words(concept)
        pipe, unet = base.pipe, base.pipe.unet
        if strength == 0:  # off: the trigger reads as the class word, nothing is installed
            return AppliedCustomDiffusion(concept=concept, pipe=pipe, strength=strength, key=None, words=words)
        key = HOOK_PREFIX + concept.trigger
        store = store_of(unet)
        table = token_table(pipe)
        if key in table.entries or (store is not None and key in store.hooks):
            raise StudioError(f"Custom Diffusion concept {concept.trigger} is already applied; remove it first.")
        deltas = layer_deltas(unet, kv_layers(concept.tensors), strength)
        try:
            table.set(key, list(concept.tokens), [e.float() for e in concept_embeddings(concept)])
        except ValueError as err:
            raise StudioError(f"Cannot add trigger {concept.trigger!r}: {err}; rename the concept's trigger.") from None
        try:  # transactional: a failure takes the tokens out again
            add_hook(unet, key, CustomDiffusionHook(deltas))
        except BaseException:
            table.drop(key)
            raise
        return AppliedCustomDiffusion(concept=concept, pipe=pipe, strength=strength, key=key, words=words)


def layer_deltas(unet: Any, kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 strength: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (s·(W_k − W₀k), s·(W_v − W₀v))}`` on the UNet's device and dtype, formed in float32."""
    out = {}
    for name, (wk, wv) in kv.items():
        attn = unet.get_submodule(name)
        w0k, w0v = base_weight(attn.to_k), base_weight(attn.to_v)
        with torch.no_grad():
            dk = (wk.to(w0k.device, torch.float32) - w0k.float()) * strength
            dv = (wv.to(w0v.device, torch.float32) - w0v.float()) * strength
        out[name] = (dk.to(w0k.dtype), dv.to(w0v.dtype))
    return out

__all__ = ["EMBEDDINGS", "K_NAME", "META_CLASS_WORDS", "METHOD", "V_NAME", "AppliedCustomDiffusion", "CustomDiffusion",
           "CustomDiffusionHook", "class_words", "concept_embeddings", "concept_tensors", "kv_layers", "layer_deltas"]
