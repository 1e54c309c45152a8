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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.attention import (
    AttentionHook,
    ConditioningStore,
    LayerInfo,
    add_hook,
    ensure_installed,
    remove_hook,
    store_of,
    unet_layers,
)
from studio.methods.base import class_word_text
from studio.methods.perfusion.covariance import CovarianceSettings, PerfusionError, inverse_covariance
from studio.methods.runtime import text_encoders, token_table
from studio.safetensors_io import FLOATS, MIB, Limits, check_values

if TYPE_CHECKING:
    from studio.concept import Concept
    from studio.models import BaseModel

I_STAR = "perfusion.i_star"
I_SUPER = "perfusion.i_super"
EMBEDDINGS = ("perfusion.embedding", "perfusion.embedding_2")  # per text encoder
V_TARGET = "perfusion.v_target.{}"
V_PREFIX = "perfusion.v_target."
META_BETA, META_TAU, META_BETA_GLOBAL, META_LOCKING = (
    "perfusion.beta", "perfusion.tau", "perfusion.beta_global", "perfusion.locking")

BETA, TAU, BETA_GLOBAL = 0.7, 0.15, 0.5  # inference defaults (paper: τ 0.15, β 0.6–0.75 local, 0.4–0.6 global)
TRAIN_BETA, TRAIN_TAU = 0.75, 0.1
HOOK_KEY = "perfusion"
LOCKINGS = ("local", "global")
ORTHOGONAL = ("approx", "exact")
CLASS_SUFFIX = "#class"  # global locking: an added token carrying the class word's input embedding


# -- the math --------------------------------------------------------------------------------------
def gate_beta(beta: float, tau: float, strength: float) -> float:
    """β shifted by the user's strength (module doc): 1 → β, → 0 closes the gate, > 1 opens it."""
    if strength <= 1:
        return beta + (1.0 - strength) * (1.0 + 4.0 * tau - beta)
    return beta - (strength - 1.0) * beta / 2.0


def linear_part(proj: Any, x: torch.Tensor) -> torch.Tensor:
    """``W x`` for the rows of ``x`` ``(M, D)`` through the module ``proj`` (bias removed):
    ``proj(x) − proj(0)``, so wrappers such as a PEFT LoRA layer are included. → ``(M, out)``."""
    zero = torch.zeros_like(x[:1])
    out = proj(torch.cat([x, zero]))
    return out[:-1] - out[-1:]


@dataclass
class PerfusionTarget:
    """One concept inside the hook: ``i*``, ``i*_super``, ``o*_V`` per layer and its gate.

    ``u = C⁻¹ i*`` ``(D,)`` and ``energy = i*ᵀ C⁻¹ i*`` (float64) are kept up to date by
    :meth:`set_i_star` (the trainer's EMA changes ``i*`` every step).
    """

    i_star: torch.Tensor  # (D,)
    i_super: torch.Tensor  # (D,)
    v_targets: list[torch.Tensor]  # per layer (inner_ℓ,); Parameters while training
    beta: float
    tau: float
    c_inv: torch.Tensor  # (D, D) float64 on the CPU (MPS has no float64), shared by the base's concepts
    u: torch.Tensor = field(init=False)
    energy: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.set_i_star(self.i_star)

    def set_i_star(self, i_star: torch.Tensor) -> None:
        """Replace ``i*`` ``(D,)`` and recompute ``u = C⁻¹ i*`` and ``energy`` (in float64)."""
        self.i_star = i_star.detach()
        star = self.i_star.to("cpu", torch.float64)
        self.u = self.c_inv.to("cpu", torch.float64) @ star  # (D,) float64, CPU
        self.energy = star @ self.u  # () float64, CPU


@dataclass
class _Bank:
    """The active targets folded into a few tensors (rebuilt when targets change), so that a layer
    call costs a handful of kernels. ``K`` concepts, ``D`` context width:

    * ``coef_w (D, 2K)``, ``coef_b (2K,)``: ``e · coef_w + coef_b = [−a | (r − β)/τ]`` for a context
      row ``e``, with ``r_k = eᵀC⁻¹i*_k / energy_k`` and ``a = r`` (approximation) or ``a = G⁻¹ sim``
      (exact; linear in ``e`` too, so it costs nothing more per call);
    * ``k_inputs (2K, D)`` = ``[i*_k; i*_super_k]`` and ``v_inputs (K, D)`` = ``[i*_k]``, detached
      (``o*_K`` is locked);
    * ``v_targets[ℓ] (K, inner_ℓ)`` stacked when no target trains (else None: read live).
    """

    n: int
    coef_w: torch.Tensor
    coef_b: torch.Tensor
    k_inputs: torch.Tensor
    v_inputs: torch.Tensor
    v_targets: list[torch.Tensor] | None
    cast: dict[tuple[str, torch.dtype, bool], torch.Tensor] = field(default_factory=dict)

    def inputs(self, which: str, dtype: torch.dtype, zero_row: bool) -> torch.Tensor:
        """``k_inputs`` / ``v_inputs`` in the projection's dtype, optionally with a zero row
        appended (to remove a wrapped projection's bias), cached per variant."""
        got = self.cast.get((which, dtype, zero_row))
        if got is None:
            x = getattr(self, which)
            x = torch.cat([x, torch.zeros_like(x[:1])]) if zero_row else x
            got = self.cast[(which, dtype, zero_row)] = x.to(dtype)
        return got


def project(proj: Any, bank: _Bank, which: str, dtype: torch.dtype) -> torch.Tensor:
    """``W x`` ``(M, out)`` float32 for the bank's input rows: a plain ``nn.Linear`` is applied as
    ``F.linear(x, weight)`` (exactly its own computation without the bias); any wrapper (a PEFT
    LoRA layer …) is called as a module, and its bias removed as ``proj(x) − proj(0)``."""
    if type(proj) is torch.nn.Linear:
        return torch.nn.functional.linear(bank.inputs(which, dtype, False), proj.weight).float()
    out = proj(bank.inputs(which, dtype, True))
    return (out[:-1] - out[-1:]).float()


class PerfusionHook(AttentionHook):
    """The ``edit_kv`` hook of every applied Perfusion concept of one UNet (key ``"perfusion"``).

    ``exact``: the Appendix-B orthogonal term instead of the default approximation. ``record``:
    keep the last gates of every layer in ``gates[layer.index]`` (``(rows, T, K)``, for probes).
    """

    def __init__(self) -> None:
        self.targets: dict[str, PerfusionTarget] = {}
        self.exact: dict[str, bool] = {}
        self.global_lock: dict[str, bool] = {}
        self.record = False
        self.gates: dict[int, torch.Tensor] = {}
        self.superclass: SuperclassContexts | None = None
        self._bank: _Bank | None = None
        self._locked_rows: torch.Tensor | None = None  # (B,) rows whose keys came from the superclass prompt

    # bookkeeping
    def add(self, key: str, target: PerfusionTarget, *, exact: bool = False, global_lock: bool = False) -> None:
        self.targets[key] = target
        self.exact[key], self.global_lock[key] = exact, global_lock
        self.invalidate()

    def drop(self, key: str) -> None:
        for d in (self.targets, self.exact, self.global_lock):
            d.pop(key, None)  # type: ignore[attr-defined]
        self.invalidate()

    def invalidate(self) -> None:
        self._bank = None

    def bank(self) -> _Bank:
        if self._bank is None:
            ts = list(self.targets.values())
            device = ts[0].i_star.device
            # folded in float64 on the CPU, used in float32 on the UNet's device
            u = torch.stack([t.u for t in ts])  # (K, D): C⁻¹ i*_k
            i_star = torch.stack([t.i_star.detach().float() for t in ts])
            i_super = torch.stack([t.i_super.detach().float() for t in ts])
            inv_energy = 1.0 / torch.stack([t.energy for t in ts])
            inv_tau = torch.tensor([1.0 / t.tau for t in ts], dtype=torch.float64)
            beta = torch.tensor([t.beta for t in ts], dtype=torch.float64)
            r_w = u.T * inv_energy  # (D, K): e · r_w = r
            a_w = r_w
            if any(self.exact.values()) and len(ts) > 1:
                # a = G⁻¹ sim with G_kl = i*_kᵀ C⁻¹ i*_l — legend: d feature, k/l concept.
                gram = torch.einsum("kd,ld->kl", i_star.to("cpu", torch.float64), u)
                a_w = u.T @ torch.linalg.inv(0.5 * (gram + gram.T))
            live = any(v.requires_grad for t in ts for v in t.v_targets)
            v_targets = None if live else [torch.stack([t.v_targets[i] for t in ts]).float()
                                           for i in range(len(ts[0].v_targets))]
            self._bank = _Bank(
                n=len(ts), coef_w=torch.cat([-a_w, r_w * inv_tau], 1).to(device, torch.float32),
                coef_b=torch.cat([torch.zeros_like(beta), -beta * inv_tau]).to(device, torch.float32),
                k_inputs=torch.cat([i_star, i_super]), v_inputs=i_star, v_targets=v_targets)
        return self._bank

    # the hook
    def context(self, store: ConditioningStore, layer: LayerInfo, ctx: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Global locking: keys read the prompt with every concept replaced by its class word."""
        self._locked_rows = None
        if self.superclass is None or not any(self.global_lock.values()):
            return None
        got = self.superclass.lookup(ctx, rows)
        if got is None:
            return None
        ctx_k, locked = got
        self._locked_rows = locked
        return ctx_k, ctx

    def coefficients(self, e: torch.Tensor, bank: _Bank) -> tuple[torch.Tensor, torch.Tensor]:
        """For context rows ``e (B, T, D)``: ``[−a | g] (B, T, 2K)`` — the orthogonal-term
        coefficients ``a`` and the gates ``g = σ((r − β)/τ)`` — and ``g (B, T, K)`` alone.
        One matmul: ``btd,dm->btm`` with the bank's folded weights."""
        b, t, d = e.shape
        z = torch.addmm(bank.coef_b, e.reshape(b * t, d).float(), bank.coef_w).view(b, t, -1)
        gates = torch.sigmoid(z[..., bank.n:])
        return torch.cat([z[..., :bank.n], gates], -1), gates

    def edit_kv(self, store: ConditioningStore, layer: LayerInfo, attn: Any, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value`` ``(B, T, inner)`` → edited on ``rows``:
        ``+ Σ_k (−a_k · W i*_k + g_k · o*_k)`` (module doc) = ``[−a | g] · [W i*; o*]``."""
        if not self.targets:
            return key, value
        bank = self.bank()
        n = bank.n
        start = rows.start or 0
        # 1. [W_K i*_k; o*_K = W_K i*_super_k] and W_V i*_k through the projections (module doc);
        #    o*_K is locked: its inputs are detached, and it never carries a gradient.
        mix_k = project(attn.to_k, bank, "k_inputs", key.dtype)  # (2K, inner)
        if mix_k.requires_grad:  # (only when the projection itself is trainable)
            mix_k = torch.cat([mix_k[:n], mix_k[n:].detach()])
        if bank.v_targets is not None:
            o_v = bank.v_targets[layer.index]
        else:  # training: read the live (trainable) targets
            ts = list(self.targets.values())
            o_v = ts[0].v_targets[layer.index][None] if n == 1 else torch.stack([t.v_targets[layer.index] for t in ts])
        mix_v = torch.cat([project(attn.to_v, bank, "v_inputs", value.dtype), o_v.float()])  # (2K, inner)
        # 2. coefficients and gates of the conditional rows (once when keys and values read one context).
        coef_k, gates = self.coefficients(ctx_k[start:], bank)
        coef_v, gates = (coef_k, gates) if ctx_v is ctx_k else self.coefficients(ctx_v[start:], bank)
        if self.record:
            self.gates[layer.index] = gates.detach()
        # 3. the rank-one edits: btm,mc->btc with m over [−a | g].
        delta_k = torch.matmul(coef_k, mix_k)
        delta_v = torch.matmul(coef_v, mix_v)
        if self._locked_rows is not None:  # global locking: those rows keep the superclass keys
            delta_k = delta_k * (~self._locked_rows[start:]).to(delta_k.dtype)[:, None, None]
        return _add_rows(key, delta_k, start), _add_rows(value, delta_v, start)


def _add_rows(x: torch.Tensor, delta: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` with ``delta`` added to rows ``start:`` (out of place, differentiable)."""
    if delta.dtype != x.dtype:
        delta = delta.to(x.dtype)
    if start == 0:
        return x + delta
    return x + torch.nn.functional.pad(delta, (0, 0, 0, 0, start, 0))


def get_hook(unet: Any) -> PerfusionHook | None:
    """The UNet's :class:`PerfusionHook`, or None when no Perfusion concept is applied."""
    store = store_of(unet)
    hook = store.hooks.get(HOOK_KEY) if store is not None else None
    return hook if isinstance(hook, PerfusionHook) else None


def ensure_hook(unet: Any) -> PerfusionHook:
    """The UNet's :class:`PerfusionHook`, installed (with the studio processors) on first use."""
    hook = get_hook(unet)
    if hook is None:
        hook = PerfusionHook()
        add_hook(unet, HOOK_KEY, hook)
    return hook


def release_hook(unet: Any, key: str, trigger: str | None = None) -> None:
    """Drop target ``key`` (and the global-locking swap of ``trigger``); the hook, and the studio
    processors if no other method uses them, leave with the last target."""
    hook = get_hook(unet)
    if hook is None:
        return
    hook.drop(key)
    if hook.superclass is not None and trigger is not None:
        hook.superclass.swaps.pop(trigger, None)
    if not hook.targets:
        if hook.superclass is not None:
            hook.superclass.close()
            hook.superclass = None
        remove_hook(unet, HOOK_KEY)


# -- global locking: the superclass prompt ---------------------------------------------------------
class SuperclassContexts:
    """Runs every text-encoder call whose ids hold a Perfusion token a second time with each such
    token swapped for its class token, and finds the result again for the UNet's context rows.

    The pipelines hand the encoder output to the UNet unchanged (up to a dtype cast, a repeat per
    image and the CFG concatenation), so a context row is matched to its superclass row by equality
    of each encoder's slice (SDXL: ``[h_L; h_G]``). Rows that match nothing keep local locking.
    States recorded: ``last_hidden_state`` and, when requested, ``hidden_states[-2]`` (SDXL); a
    pipeline that reads another layer (``clip_skip``) falls back to local locking.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.swaps: dict[str, str] = {}  # concept token → class token
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (encoder, (B,T,De) orig, super)
        self.widths = [int(te.config.hidden_size) for _, te in text_encoders(pipe)]
        self._busy = False
        self._seen: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self.handles = [te.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, (_, te) in enumerate(text_encoders(pipe))]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.records, self._seen = [], [], None

    def _hook(self, index: int) -> Callable[[Any, tuple, dict, Any], None]:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if self._busy or not self.swaps:
                return
            ids = args[0] if args else kwargs.get("input_ids")
            if not isinstance(ids, torch.Tensor):
                return
            tok = text_encoders(self.pipe)[index][0]
            swapped = ids.clone()
            for concept_tok, class_tok in self.swaps.items():
                swapped[ids == tok.convert_tokens_to_ids(concept_tok)] = tok.convert_tokens_to_ids(class_tok)
            if torch.equal(swapped, ids):
                return
            rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
            self._busy = True
            try:
                with torch.no_grad():
                    other = module(swapped, *args[1:], **rest)
            finally:
                self._busy = False
            self.records.append((index, output[0].detach(), other[0].detach()))
            if getattr(output, "hidden_states", None) is not None and getattr(other, "hidden_states", None) is not None:
                self.records.append((index, output.hidden_states[-2].detach(), other.hidden_states[-2].detach()))
            self.records = self.records[-16:]
            self._seen = None
        return hook

    def _find(self, index: int, row: torch.Tensor) -> torch.Tensor | None:
        for enc, orig, sup in reversed(self.records):
            if enc != index or orig.shape[-2:] != row.shape:
                continue
            for j in range(orig.shape[0]):
                if torch.equal(orig[j].to(row.dtype), row):
                    return sup[j].to(row.dtype)
        return None

    def lookup(self, ctx: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(ctx_for_keys (B, T, D), locked (B,) bool)`` or None when no row matches. Cached for
        the tensor object: every layer of one UNet call receives the same context tensor."""
        if self._seen is not None and self._seen[0] is ctx:
            return self._seen[1]
        if sum(self.widths) != ctx.shape[-1] or not self.records:
            result = None
        else:
            ctx_k = ctx.clone()
            locked = torch.zeros(ctx.shape[0], dtype=torch.bool, device=ctx.device)
            for b in range(rows.start or 0, ctx.shape[0]):
                parts, offset = [], 0
                for i, w in enumerate(self.widths):
                    parts.append(self._find(i, ctx[b, :, offset:offset + w]))
                    offset += w
                if all(p is not None for p in parts):
                    ctx_k[b] = torch.cat(parts, dim=-1)  # type: ignore[arg-type]
                    locked[b] = True
            result = (ctx_k, locked) if bool(locked.any()) else None
        self._seen = (ctx, result)
        return result


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
        encs = text_encoders(base.pipe)
        embs = concept_embeddings(concept)
        if len(embs) != len(encs) or any(e.shape[0] != te.config.hidden_size for e, (_, te) in zip(embs, encs)):
            raise IncompatibleConceptError(
                f"Perfusion concept {label} has token embeddings {[e.shape[0] for e in embs]} but base {base.name}'s "
                f"text encoders are {[te.config.hidden_size for _, te in encs]}-d; it was made for another family.")

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
