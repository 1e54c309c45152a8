"""The hook protocol of the shared cross-attention processor (see :mod:`studio.methods.attention`):
a layer's description, the base class a method's hook overrides, and the per-UNet store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class LayerInfo:
    """A cross-attention layer: its index in execution order, module name, and widths."""

    index: int
    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    context_dim: int  # width of the encoder states it reads (cross_attention_dim)
    inner_dim: int  # width of its keys/values (to_k.out_features)


class AttentionHook:
    """Base class: override what the method needs. ``rows`` selects the batch rows a hook may change
    (the conditional half under classifier-free guidance, else every row)."""

    passive: ClassVar[bool] = False
    """True for a hook that only stands in for a replaced processor (diffusers' IP-Adapter): it does
    not keep the studio processors installed once every active hook has left."""

    def context(self, store: ConditioningStore, layer: LayerInfo, ctx: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return ``(ctx_for_keys, ctx_for_values)`` (B, T, D) or None to leave them."""
        return None

    def edit_kv(self, store: ConditioningStore, layer: LayerInfo, attn: Any, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Return edited ``(key, value)`` (B, T, inner)."""
        return key, value

    def extra(self, store: ConditioningStore, layer: LayerInfo, attn: Any, query: torch.Tensor,
              rows: slice) -> torch.Tensor | None:
        """An extra attention output (B, N, inner) added before the output projection, or None."""
        return None

    def wants_probs(self, store: ConditioningStore, layer: LayerInfo) -> bool:
        """True on the layers (and at the moments) where this hook needs the attention probabilities;
        only there does the processor materialise them (see :meth:`probs`). Asked on every call."""
        return False

    def probs(self, store: ConditioningStore, layer: LayerInfo, probs: torch.Tensor, rows: slice) -> None:
        """Receive ``A = softmax(QKᵀ/√d + mask)`` (B, heads, N, T), float32, of ``layer``'s text
        attention (after every ``context``/``edit_kv`` hook) — called only where :meth:`wants_probs`
        said True. ``A`` is part of the autograd graph: a loss on it reaches the keys and queries."""


@dataclass
class ConditioningStore:
    """Shared state of the studio processors of one UNet."""

    layers: list[LayerInfo]
    hooks: dict[str, AttentionHook] = field(default_factory=dict)
    timestep: torch.Tensor | None = None  # the UNet call's timestep(s): () or (B,)
    uncond_rows: int = 0  # leading rows of the batch that are the unconditional CFG half
    original: dict[str, Any] = field(default_factory=dict)  # processors to restore
    handle: Any = None  # the UNet forward pre-hook
    extra: dict[str, Any] = field(default_factory=dict)  # per-method shared data (e.g. IP image tokens)

    def rows(self, batch: int) -> slice:
        return slice(self.uncond_rows if 0 < self.uncond_rows < batch else 0, batch)
