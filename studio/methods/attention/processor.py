"""One processor per cross-attention layer, shared by every method that needs attention hooks.

Perfusion (K/V rank-one edits), NeTI (per-layer, per-timestep text contexts) and IP-Adapter
(decoupled image attention) all work inside the UNet's cross-attention. If each replaced the
processors with its own, the last one installed would silently drop the others. Instead:

* :class:`ConditioningStore` hangs on the UNet: the cross-attention layers in execution order
  (:class:`LayerInfo`, derived from the UNet — never a hard-coded count), the current timestep
  (set by a forward pre-hook on the UNet), how many leading batch rows are the unconditional half
  of a classifier-free-guidance batch, and the active :class:`AttentionHook` objects by key.
* :class:`StudioCrossAttnProcessor` (one instance per layer, with a fixed layer index — no call
  counters, so gradient checkpointing and re-entrant calls are safe) runs the standard scaled-dot-
  product attention and lets every hook act in turn:

  1. ``context``: replace the text states used for keys and for values (NeTI);
  2. ``edit_kv``: edit the projected keys/values (Perfusion) — hooks receive ``attn`` and call
     ``attn.to_k``/``attn.to_v`` themselves, so a PEFT LoRA on those projections still applies;
  3. ``extra``: add an output computed from the query (IP-Adapter's image attention).

  **Attention probabilities** (CoRe's attention loss; Break-A-Scene's and other analyses): SDPA never
  materialises ``A = softmax(QKᵀ/√d)``. A hook that needs it overrides ``wants_probs(store, layer)``
  (asked on every call, so a hook can capture only on some layers and only during some UNet calls)
  and ``probs(store, layer, probs, rows)``. On a layer where at least one hook wants them, the
  processor computes ``A`` (B, heads, N, T) explicitly (mask, ``norm_q``/``norm_k`` and heads as
  SDPA sees them; float32 softmax), does ``A·V`` itself and hands ``A`` to those hooks, still in the
  autograd graph; every other layer — and every layer while no hook wants them — runs
  ``F.scaled_dot_product_attention`` exactly as before. Both paths agree to float error
  (``tests/test_attention_capture.py``).

  When the UNet carries diffusers' IP-Adapter projection (``load_ip_adapter``), diffusers passes
  ``encoder_hidden_states`` as a tuple ``(text, [image tokens per adapter])``: the processor keeps
  the text and puts the image tokens (and ``cross_attention_kwargs["ip_adapter_masks"]``) in
  ``store.extra["ip_tokens"]`` / ``store.extra["ip_masks"]`` for the IP hooks.

* The processors are installed when the first hook is added and the UNet's own processors are
  put back when the last hook leaves, so ``remove`` restores the base exactly. If something
  (``enable_xformers_memory_efficient_attention``, ``load_ip_adapter`` …) replaced them meanwhile,
  :func:`ensure_installed` installs ours again over the new ones. Processors that own weights
  (diffusers' IP-Adapter processors with ``to_k_ip``/``to_v_ip``) are not dropped: a *passive* hook
  (:mod:`studio.methods.attention.ip`) keeps their image attention running inside ours, and they come
  back when the last active hook leaves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from studio.methods.attention.hooks import AttentionHook, ConditioningStore, LayerInfo
from studio.methods.attention.ip import adopt_diffusers_ip_adapter
from studio.models.keys import cross_attention_layers


class StudioCrossAttnProcessor:
    """Scaled-dot-product cross-attention with the store's hooks (see the module docstring)."""

    def __init__(self, store: ConditioningStore, layer: LayerInfo):
        self.store, self.layer = store, layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, ip_adapter_masks: Any = None, **kwargs: Any) -> torch.Tensor:
        store, layer = self.store, self.layer
        ip_tokens = None
        if isinstance(encoder_hidden_states, tuple):  # (text (B, T, D), [image tokens (B, n_img, T_ip, D)])
            encoder_hidden_states, ip_tokens = encoder_hidden_states[0], list(encoder_hidden_states[1])
        store.extra["ip_tokens"], store.extra["ip_masks"] = ip_tokens, ip_adapter_masks
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = ctx.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, N, inner)
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        rows = store.rows(batch)
        hooks = list(store.hooks.values())
        ctx_k = ctx_v = ctx
        for hook in hooks:  # 1. contexts (NeTI)
            got = hook.context(store, layer, ctx_k, rows)
            if got is not None:
                ctx_k, ctx_v = got
        key, value = attn.to_k(ctx_k), attn.to_v(ctx_v)  # (B, T, inner)
        for hook in hooks:  # 2. K/V edits (Perfusion)
            key, value = hook.edit_kv(store, layer, attn, ctx_k, ctx_v, key, value, rows)
        capture = [hook for hook in hooks if hook.wants_probs(store, layer)]
        if capture:  # only here: A materialised, A·V done by hand (equal to SDPA within float error)
            out, probs = _attention_with_probs(attn, query, key, value, attention_mask)
            for hook in capture:
                hook.probs(store, layer, probs, rows)
        else:
            out = _sdpa(attn, query, key, value, attention_mask)
        for hook in hooks:  # 3. extra attention (IP-Adapter)
            more = hook.extra(store, layer, attn, query, rows)
            if more is not None:
                out = out + more
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _sdpa(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, inner) × (B, T, inner) → (B, N, inner) multi-head attention."""
    b, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(b, -1, heads, head_dim).transpose(1, 2)
    k = key.view(b, -1, heads, head_dim).transpose(1, 2)
    v = value.view(b, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * head_dim)


def _attention_with_probs(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`_sdpa` computes, plus the probabilities: ``(out (B, N, inner), A (B, heads, N, T))``.

    ``A = softmax(q kᵀ / √d + mask)`` with SDPA's scale (``1/√head_dim``) and mask convention (a bool
    mask keeps True, a float mask is added), softmax in float32; ``out = A·V`` in the values' dtype."""
    b, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(b, -1, heads, head_dim).transpose(1, 2)
    k = key.view(b, -1, heads, head_dim).transpose(1, 2)
    v = value.view(b, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    scores = (q.float() @ k.float().transpose(-1, -2)) * head_dim ** -0.5  # (B, heads, N, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(dim=-1)
    out = probs.to(v.dtype) @ v
    return out.transpose(1, 2).reshape(b, -1, heads * head_dim), probs


def unet_layers(unet: Any) -> list[LayerInfo]:
    """The UNet's cross-attention layers in execution order."""
    out = []
    for i, name in enumerate(cross_attention_layers(unet)):
        attn = unet.get_submodule(name)
        out.append(LayerInfo(i, name, int(attn.to_k.in_features), int(attn.to_k.out_features)))
    return out


def store_of(unet: Any) -> ConditioningStore | None:
    return getattr(unet, "_studio_store", None)


def add_hook(unet: Any, key: str, hook: AttentionHook) -> ConditioningStore:
    """Register ``hook`` under ``key`` (installing the studio processors if needed)."""
    store = store_of(unet)
    if store is None:
        store = ConditioningStore(layers=unet_layers(unet))
        unet._studio_store = store
    if key in store.hooks:
        raise ValueError(f"an attention hook {key!r} is already installed")
    store.hooks[key] = hook
    try:
        ensure_installed(unet)
    except BaseException:  # transactional: without this hook the UNet is as it was (processors, store)
        remove_hook(unet, key)
        raise
    return store


def remove_hook(unet: Any, key: str) -> None:
    """Unregister ``key``; with no hook left, the UNet's previous processors come back."""
    store = store_of(unet)
    if store is None:
        return
    store.hooks.pop(key, None)
    if all(hook.passive for hook in store.hooks.values()):
        procs = dict(unet.attn_processors)
        procs.update(store.original)
        unet.set_attn_processor(procs)
        if store.handle is not None:
            store.handle.remove()
        del unet._studio_store


def ensure_installed(unet: Any) -> None:
    """(Re)install the studio processor on every cross-attention layer, remembering what was there."""
    store = store_of(unet)
    if store is None:
        return
    procs = dict(unet.attn_processors)
    changed = False
    for layer in store.layers:
        key = f"{layer.name}.processor"
        current = procs[key]
        if not isinstance(current, StudioCrossAttnProcessor) or current.store is not store:
            store.original[key] = current
            procs[key] = StudioCrossAttnProcessor(store, layer)
            changed = True
    if changed:
        unet.set_attn_processor(procs)
        if any(hasattr(p, "to_k_ip") for p in store.original.values()):
            adopt_diffusers_ip_adapter(store)
    if store.handle is None:
        store.handle = unet.register_forward_pre_hook(_timestep_hook(store), with_kwargs=True)


def _timestep_hook(store: ConditioningStore):
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        store.timestep = t if isinstance(t, torch.Tensor) else torch.tensor(t)
    return hook


class cfg_layout:  # noqa: N801 - used as a context manager like a function
    """``with cfg_layout(unet, guided=True):`` — the first half of every UNet batch is the
    unconditional prompt (diffusers' pipelines concatenate ``[negative, positive]``)."""

    def __init__(self, unet: Any, guided: bool):
        self.unet, self.guided = unet, guided

    def __enter__(self) -> None:
        store = store_of(self.unet)
        if store is not None:
            ensure_installed(self.unet)
            store.extra["guided"] = self.guided
            self._pre = self.unet.register_forward_pre_hook(self._rows, with_kwargs=True)

    def _rows(self, module: Any, args: tuple, kwargs: dict) -> None:
        store = store_of(self.unet)
        sample = args[0] if args else kwargs["sample"]
        if store is not None:
            store.uncond_rows = sample.shape[0] // 2 if self.guided else 0

    def __exit__(self, *exc: Any) -> None:
        if hasattr(self, "_pre"):
            self._pre.remove()
        store = store_of(self.unet)
        if store is not None:
            store.uncond_rows = 0
