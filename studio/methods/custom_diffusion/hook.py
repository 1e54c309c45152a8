"""Custom Diffusion's attention hook: trained cross-attention K/V projections as per-layer weight deltas
inside the shared processor (Kumari et al., CVPR 2023, §3.1; docs/methods.md, "Custom Diffusion").

For every cross-attention layer ℓ whose projections the concept trained, the hook adds

    key   ← key   + s · ctx_k ΔW_kᵀ        value ← value + s · ctx_v ΔW_vᵀ

to the keys and values the processor computed through ``attn.to_k``/``attn.to_v`` — so the result is
``(W₀ + s·ΔW) ctx`` plus whatever else acts on those projections (a PEFT LoRA of another concept, a
Perfusion edit in the same ``edit_kv`` stage, a NeTI context from the ``context`` stage). ``ΔW =
W_trained − W₀`` ``(inner, D)``. Unlike Perfusion, every batch row is edited, the unconditional CFG
half included: Custom Diffusion changes the model's weights, and diffusers' own
``CustomDiffusionAttnProcessor`` applies its weights to every row (the export's parity test relies
on it).

While training (``train=True``) the update's row at the start-of-text position is detached, as the
authors' and diffusers' processors do: that token is in every prompt, so learning through it would
change every prompt's output, concept or not (measured against both references in
bench/parity/custom_diffusion.py). The forward values are the same either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from studio.methods.attention import AttentionHook, ConditioningStore, LayerInfo

HOOK_PREFIX = "custom_diffusion:"


class CustomDiffusionHook(AttentionHook):
    """The K/V deltas of one concept (or of one training run), by layer name.

    ``deltas[name] = (ΔW_k, ΔW_v)``, each ``(inner, D)``, already multiplied by the strength; while
    training they are the trainable Parameters themselves (strength 1)."""

    def __init__(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], *, train: bool = False):
        self.deltas, self.train = deltas, train

    def edit_kv(self, store: ConditioningStore, layer: LayerInfo, attn: Any, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value`` ``(B, T, inner)`` + ``ctx (B, T, D) @ ΔWᵀ (D, inner)`` on every row."""
        pair = self.deltas.get(layer.name)
        if pair is None:
            return key, value
        dk, dv = pair
        return self._add(key, ctx_k, dk), self._add(value, ctx_v, dv)

    def _add(self, base: torch.Tensor, ctx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``base + ctx ΔWᵀ``; in training the start-of-text row's update carries no gradient."""
        d = F.linear(ctx.to(delta.dtype), delta).to(base.dtype)  # (B, T, inner)
        if self.train and d.requires_grad:
            d = torch.cat([d[:, :1].detach(), d[:, 1:]], dim=1)
        return base + d


def base_weight(proj: Any) -> torch.Tensor:
    """The base weight ``W₀`` ``(out, in)`` of a projection, also when a PEFT LoRA wraps it (``base_layer``)."""
    inner = getattr(proj, "base_layer", proj)
    return inner.weight
