"""Perfusion's attention hook: the gated rank-one edit of keys and values (Tewel et al. 2023, Eq. (5)–(7);
docs/methods.md §4) inside the shared processor, and the superclass contexts of global locking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from studio.methods.attention import (
    AttentionHook,
    ConditioningStore,
    LayerInfo,
    add_hook,
    remove_hook,
    store_of,
)
from studio.methods.runtime import text_encoders

if TYPE_CHECKING:
    pass


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
            d.pop(key, None)
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
