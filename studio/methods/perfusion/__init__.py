"""Perfusion concepts: key-locked, gated rank-one edits of every cross-attention K and V
(Tewel et al., "Key-Locked Rank One Editing for Text-to-Image Personalization", SIGGRAPH 2023;
docs/methods.md §4). No official code exists; this is built from the paper's equations.

**The edit** (paper §4, the gated rank-one edit). For a cross-attention projection ``W`` (``W_K`` or ``W_V``, ``(out, D)``)
and every context row ``e`` ``(D,)`` of the conditional CFG rows::

    sim = eᵀ C⁻¹ i*,   energy = i*ᵀ C⁻¹ i*,   r = sim / energy
    W′e = W (e − r·i*) + σ((r − β)/τ) · o*

``C⁻¹`` is the inverse caption covariance of the base (:mod:`studio.methods.perfusion.covariance`), ``i*``
the concept's encoding, ``o*`` the target the concept's own encoding is mapped to. Everything is
computed **through** ``attn.to_k`` / ``attn.to_v`` (``W x = to_k(x) − to_k(0)``), never by reading
``.weight``, so a PEFT LoRA on those layers (a LoRA concept applied at the same time) still acts;
a bias stays outside the edit (``to_k′(e) = b + W′e``).

* **Key locking**: ``o*_K = W_K · i*_super`` — the superclass word's encoding through the (current)
  key projection. It is recomputed at every call from the stored ``i*_super``, never stored, never
  trained (detached). ``o*_V`` is learned per layer (initialised to ``W_V · i*_super``).
* **Global locking** (optional, ``locking="global"``): the keys of the whole prompt are computed
  from the prompt with every Perfusion token replaced by its class word (the text encoder runs a
  second time on that prompt; :class:`SuperclassContexts`), and only the values are edited. The
  paper recommends β ≈ 0.4–0.6 there (``perfusion.beta_global``).
* **Several concepts** ``k = 1 … K`` (paper Appendix B): the gated terms add up; the orthogonal
  term removes the ``C⁻¹``-span of all ``i*_k``. Default — the approximation the author recommends
  in practice: ``W e − Σ_k r_k · W i*_k`` (exact for one concept, and for ``C⁻¹``-orthogonal
  ``i*_k``). ``orthogonal="exact"`` uses the projection itself: coefficients
  ``a = G⁻¹ s`` with ``s_k = eᵀC⁻¹i*_k`` and Gram ``G_kl = i*_kᵀ C⁻¹ i*_l``, ``W′e = W(e − Σ_k a_k i*_k)
  + Σ_k σ((r_k − β_k)/τ_k) o*_k``. Perfusion concepts mix freely with TI and LoRA concepts.

**Tensors** of a concept (explicit names). SD 1.5 (16 layers, Σ out = 12,480, D = 768): 14,784 floats,
a 61 KB file in fp32 (``o*_K`` is not stored: with it, ~111 KB — the paper's "100 KB"). SDXL (70 layers,
Σ out = 83,200, D = 2048): 89,344 floats, 364 KB.

======================================  ===================================================
``perfusion.v_target.{ℓ}``              ``o*_V`` of cross-attention layer ℓ (execution order), (inner_ℓ,)
``perfusion.i_star``                    ``i*``, the concept's encoding, (D,)
``perfusion.i_super``                   ``i*_super``, the class word's encoding (for ``o*_K``), (D,)
``perfusion.embedding``                 the trigger token's input embedding, (D_in,)
``perfusion.embedding_2``               SDXL only: its embedding in the second encoder, (D_in2,)
======================================  ===================================================

``D`` is the width of the context the UNet reads: 768 (SD 1), 1024 (SD 2), and for SDXL the
2048-d concatenation of both encoders' penultimate states (``C`` is the covariance of that 2048-d
vector — see :mod:`studio.methods.perfusion.covariance`). Metadata: ``studio.class_word`` (required) and
``perfusion.beta`` / ``perfusion.tau`` / ``perfusion.beta_global`` / ``perfusion.locking`` (defaults at
inference; training uses β = 0.75, τ = 0.1).

**Strength** ``s`` goes through the gate: ``β(s) = β + (1 − s)(1 + 4τ − β)`` for ``s ≤ 1`` (as ``s → 0``
the gate at the concept's own encoding closes to ``σ(−4) ≈ 0.018``), ``β(s) = β − (s − 1)·β/2`` above
1 (the gate opens further, up to ``β/2`` at ``s = 2``). At ``s = 0`` the concept is off: no edit, no
token, and the trigger is rewritten to the class word, so the image is the class-word image. (Any
``s > 0`` still removes the ``i*`` component — only the gated target fades — so small strengths read
as the concept's token with little content, not yet as the class word.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.attention import (
    ensure_installed,
    unet_layers,
)
from studio.methods.base import class_word_text
from studio.methods.perfusion.covariance import CovarianceSettings, PerfusionError, inverse_covariance
from studio.methods.perfusion.hook import (
    BETA,
    BETA_GLOBAL,
    CLASS_SUFFIX,
    EMBEDDINGS,
    I_STAR,
    I_SUPER,
    LOCKINGS,
    META_BETA,
    META_BETA_GLOBAL,
    META_LOCKING,
    META_TAU,
    ORTHOGONAL,
    TAU,
    TRAIN_BETA,
    TRAIN_TAU,
    V_PREFIX,
    V_TARGET,
    PerfusionHook,
    PerfusionTarget,
    SuperclassContexts,
    ensure_hook,
    gate_beta,
    get_hook,
    linear_part,
    release_hook,
)
from studio.methods.runtime import check_embedding_widths, token_table
from studio.safetensors_io import FLOATS, MIB, Limits, check_values

if TYPE_CHECKING:
    from studio.concept import Concept
    from studio.models import BaseModel

# -- concepts --------------------------------------------------------------------------------------
def v_target_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in tensors if k.startswith(V_PREFIX))


def concept_floats(concept: Concept) -> tuple[float, float, float, str]:
    """``(β, τ, β_global, locking)`` defaults from the concept's metadata (validated)."""
    md = concept.meta
    try:
        beta = float(md.get(META_BETA, BETA))
        tau = float(md.get(META_TAU, TAU))
        beta_global = float(md.get(META_BETA_GLOBAL, BETA_GLOBAL))
    except ValueError:
        raise ConceptFormatError(f"Perfusion concept {concept.name}: {META_BETA}/{META_TAU}/{META_BETA_GLOBAL} "
                                 "must be numbers.") from None
    locking = md.get(META_LOCKING, "local")
    if not all(math.isfinite(x) for x in (beta, tau, beta_global)) or tau <= 0:
        raise ConceptFormatError(f"Perfusion concept {concept.name}: gate β={beta}, τ={tau}, β_global={beta_global} "
                                 "must be finite with τ > 0.")
    if locking not in LOCKINGS:
        raise ConceptFormatError(f"Perfusion concept {concept.name}: {META_LOCKING} is {locking!r}, "
                                 f"expected one of {LOCKINGS}.")
    return beta, tau, beta_global, locking


def concept_embeddings(concept: Concept) -> list[torch.Tensor]:
    """The trigger's input embedding per text encoder, each ``(D_in,)``."""
    return [concept.tensors[k] for k in EMBEDDINGS if k in concept.tensors]


def concept_tensors(*, v_targets: Sequence[torch.Tensor], i_star: torch.Tensor, i_super: torch.Tensor,
                    embeddings: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named tensors of a concept (CPU float32, contiguous)."""
    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", torch.float32).reshape(-1).contiguous().clone()

    out = {V_TARGET.format(i): t(v) for i, v in enumerate(v_targets)}
    out.update({I_STAR: t(i_star), I_SUPER: t(i_super)})
    out.update({k: t(e) for k, e in zip(EMBEDDINGS, embeddings)})
    return out


def concept_meta(beta: float = BETA, tau: float = TAU, beta_global: float = BETA_GLOBAL,
                 locking: str = "local") -> dict[str, str]:
    return {META_BETA: repr(float(beta)), META_TAU: repr(float(tau)), META_BETA_GLOBAL: repr(float(beta_global)),
            META_LOCKING: locking}


@dataclass
class AppliedPerfusion:
    concept: Concept
    pipe: Any
    strength: float
    key: str | None  # None when the concept is off (strength 0)

    def prompt_text(self) -> str:
        return self.concept.trigger if self.key is not None else class_word_text(self.concept)

    def remove(self) -> None:
        if self.key is None:
            return
        release_hook(self.pipe.unet, self.key, self.concept.trigger)
        token_table(self.pipe).drop(self.key)
        self.key = None


class Perfusion:
    name: ClassVar[str] = "perfusion"
    importers: ClassVar[tuple] = ()  # no other tool writes this method's files
    exporters: ClassVar[dict] = {}
    # Its files are no embedding, yet ComfyUI would load their first tensor as one: mark them
    # (studio.concept.GUARD_TENSOR) so embedding loaders skip them.
    embedding_guard: ClassVar[bool] = True
    trigger_is_subject: ClassVar[bool] = True  # trained as "a photo of <tok>"
    description: ClassVar[str] = "key-locked gated rank-one K/V edits (~60 KB, combines with other concepts)"
    # Files: float16/bfloat16/float32; an SDXL concept is 364 KB, so 64 MiB (ref.* embeddings
    # included) refuses absurd headers before any allocation.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=64 * MIB)
    # i*, i*_super are text-encoder states (outlier channels reach a few hundred), o*_V their value
    # projections, the embedding an input row (< 1): 1e4 is far above all of them.
    max_abs: ClassVar[float] = 1e4

    def validate(self, concept: Concept) -> None:
        label = concept.name or concept.trigger
        tensors = concept.tensors
        n = v_target_count(tensors)
        expected = {V_TARGET.format(i) for i in range(n)} | {I_STAR, I_SUPER, EMBEDDINGS[0]}
        extra = set(tensors) - expected - {EMBEDDINGS[1]}
        missing = expected - set(tensors)
        if n == 0 or missing or extra:
            raise ConceptFormatError(
                f"Perfusion concept {label} must hold {I_STAR}, {I_SUPER}, {EMBEDDINGS[0]} and "
                f"{V_TARGET.format('0')}…; missing {sorted(missing) or 'none'}, unexpected {sorted(extra) or 'none'}.")
        bad = [k for k, v in tensors.items() if v.ndim != 1 or v.numel() == 0 or not v.is_floating_point()]
        if bad:
            raise ConceptFormatError(f"Perfusion concept {label}: tensors {bad} must be non-empty float vectors.")
        check_values(tensors, f"Perfusion concept {label}", dtypes=FLOATS, max_abs=self.max_abs)
        if tensors[I_STAR].shape != tensors[I_SUPER].shape:
            raise ConceptFormatError(f"Perfusion concept {label}: i* {tuple(tensors[I_STAR].shape)} and i*_super "
                                     f"{tuple(tensors[I_SUPER].shape)} must have one width.")
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError(f"A Perfusion concept has exactly one trigger token; {label} has {concept.tokens}.")
        if not concept.class_word.strip():
            raise ConceptFormatError(f"Perfusion concept {label} has no class word; Perfusion needs one (its "
                                     "superclass, e.g. 'teddy').")
        concept_floats(concept)

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        from studio.models.families import check_unet_family

        check_unet_family(base, "Perfusion concepts")  # SD 3 / FLUX: one clear sentence
        label = concept.name or concept.trigger
        layers = unet_layers(base.pipe.unet)
        tensors = concept.tensors
        n = v_target_count(tensors)
        if n != len(layers):
            raise IncompatibleConceptError(
                f"Perfusion concept {label} has value targets for {n} cross-attention layers but base {base.name} has "
                f"{len(layers)}; it was made for another model family.")
        for layer in layers:
            v = tensors[V_TARGET.format(layer.index)]
            if v.shape[0] != layer.inner_dim:
                raise IncompatibleConceptError(
                    f"Perfusion concept {label}: layer {layer.index} ({layer.name}) is {layer.inner_dim}-d in base "
                    f"{base.name} but its value target is {v.shape[0]}-d; it was made for another model family.")
        if tensors[I_STAR].shape[0] != layers[0].context_dim:
            raise IncompatibleConceptError(
                f"Perfusion concept {label}: i* is {tensors[I_STAR].shape[0]}-d but base {base.name}'s UNet reads a "
                f"{layers[0].context_dim}-d text context; it was made for another model family.")
        check_embedding_widths(f"Perfusion concept {label}", [int(e.shape[0]) for e in concept_embeddings(concept)],
                               base)

    def apply(self, base: BaseModel, concept: Concept, *, strength: float, locking: str | None = None,
              orthogonal: str = "approx", beta: float | None = None, tau: float | None = None,
              covariance: CovarianceSettings | None = None) -> AppliedPerfusion:
        """Apply at ``strength`` (through the gate, module doc). Options beyond the protocol:
        ``locking`` (``local``/``global``; default: the concept's), ``orthogonal`` (``approx``, the
        author-recommended sum, or ``exact``, Appendix B), ``beta``/``tau`` overrides, and the
        covariance settings (corpus) of ``C⁻¹``."""
        self.check_base(concept, base)
        d_beta, d_tau, d_beta_global, d_locking = concept_floats(concept)
        locking = locking or d_locking
        if locking not in LOCKINGS or orthogonal not in ORTHOGONAL:
            raise PerfusionError(f"locking must be one of {LOCKINGS} and orthogonal one of {ORTHOGONAL}; "
                                 f"got {locking!r}, {orthogonal!r}.")
        if strength == 0:  # off: the trigger reads as the class word, nothing is installed
            return AppliedPerfusion(concept=concept, pipe=base.pipe, strength=strength, key=None)
        pipe, unet = base.pipe, base.pipe.unet
        device = next(unet.parameters()).device
        cov = inverse_covariance(base, covariance)
        b0 = beta if beta is not None else (d_beta_global if locking == "global" else d_beta)
        t0 = tau if tau is not None else d_tau
        t = concept.tensors
        target = PerfusionTarget(
            i_star=t[I_STAR].to(device, torch.float32), i_super=t[I_SUPER].to(device, torch.float32),
            v_targets=[t[V_TARGET.format(i)].to(device, torch.float32) for i in range(v_target_count(t))],
            beta=gate_beta(b0, t0, strength), tau=t0, c_inv=cov.c_inv)
        key = f"perfusion:{concept.trigger}"
        table = token_table(pipe)
        hook = get_hook(unet)
        if key in table.entries or (hook is not None and key in hook.targets):
            raise StudioError(f"Perfusion concept {concept.trigger} is already applied; remove it first.")
        tokens, vectors = [concept.trigger], [e[None].float() for e in concept_embeddings(concept)]
        if locking == "global":
            from studio.methods.textual_inversion import class_embedding

            tokens.append(concept.trigger + CLASS_SUFFIX)
            vectors = [torch.cat([v, class_embedding(tok, emb, concept.class_word)[None]])
                       for v, tok, emb in zip(vectors, table.pristine_tokenizers, table.original_embeddings)]
        try:
            table.set(key, tokens, vectors)
        except ValueError as err:
            raise StudioError(f"Cannot add trigger {concept.trigger!r}: {err}; rename the concept's trigger.") from None
        try:  # transactional: a failure below takes the hook target and the tokens out again
            hook = ensure_hook(unet)
            hook.add(key, target, exact=orthogonal == "exact", global_lock=locking == "global")
            if locking == "global":
                if hook.superclass is None:
                    hook.superclass = SuperclassContexts(pipe)
                hook.superclass.swaps[concept.trigger] = concept.trigger + CLASS_SUFFIX
            ensure_installed(unet)
        except BaseException:
            release_hook(unet, key, concept.trigger)
            table.drop(key)
            raise
        return AppliedPerfusion(concept=concept, pipe=pipe, strength=strength, key=key)

__all__ = [
    'AppliedPerfusion',
    'BETA',
    'BETA_GLOBAL',
    'CLASS_SUFFIX',
    'EMBEDDINGS',
    'I_STAR',
    'I_SUPER',
    'LOCKINGS',
    'META_BETA',
    'META_BETA_GLOBAL',
    'META_LOCKING',
    'META_TAU',
    'ORTHOGONAL',
    'Perfusion',
    'PerfusionHook',
    'PerfusionTarget',
    'SuperclassContexts',
    'TAU',
    'TRAIN_BETA',
    'TRAIN_TAU',
    'V_PREFIX',
    'V_TARGET',
    'concept_embeddings',
    'concept_floats',
    'concept_meta',
    'concept_tensors',
    'ensure_hook',
    'gate_beta',
    'get_hook',
    'linear_part',
    'release_hook',
    'v_target_count',
]
