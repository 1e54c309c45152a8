"""The studio's IP-Adapter hook: an adapter with cached image embeddings as an ``extra`` hook of the
shared processor (Ye et al. 2023, eq. 5; docs/methods.md §6), so it composes with every other method."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from studio.errors import StudioError
from studio.methods.attention.hooks import AttentionHook, ConditioningStore, LayerInfo
from studio.methods.attention.ip import ip_attention
from studio.methods.zeroshot.adapter import LoadedAdapter


def layer_scales(unet: Any, layers: Sequence[LayerInfo], config: float | dict | None) -> list[float]:
    """Per-layer multipliers from a diffusers ``set_ip_adapter_scale`` config (InstantStyle):
    a float, or ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`` — blocks
    it does not name get 0, as in diffusers."""
    if config is None or isinstance(config, (int, float)):
        return [1.0 if config is None else float(config)] * len(layers)
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    try:
        expanded = _maybe_expand_lora_scales(unet, [config], default_scale=0.0)[0]
        out = []
        for layer in layers:
            s = 0.0
            for prefix, value in expanded.items():
                if layer.name.startswith(prefix):
                    s = float(value)
            out.append(s)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # the config comes from a concept file
        raise StudioError(f"Per-layer adapter scales {json.dumps(config)} do not fit this base: {err}") from None
    return out


class IPAdapterHook(AttentionHook):
    """Decoupled image attention of one adapter with cached image embeddings.

    embeds: (1, n_img, D_e) or (1, n_img, T, D_h); negative: same shape (what the unconditional CFG
    rows see). ``batch_embeds`` (B, n_img, …), when set, is used as is for a batch of B rows
    (training). ``scale`` is λ; ``scales[i]`` multiplies it in layer i (per-layer configs).
    """

    def __init__(self, adapter: LoadedAdapter, embeds: torch.Tensor | None, negative: torch.Tensor | None, *,
                 scale: float = 1.0, scales: Sequence[float] | None = None, mask: torch.Tensor | None = None):
        self.adapter, self.embeds, self.negative = adapter, embeds, negative
        self.scale, self.scales, self.mask = float(scale), list(scales) if scales is not None else None, mask
        self.batch_embeds: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._key: tuple[int, int] | None = None
        self._handle: Any = None

    # lifecycle: a UNet pre-hook marks the cached tokens stale at every UNet call
    def attach(self, unet: Any) -> None:
        self._handle = unet.register_forward_pre_hook(self._stale)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._tokens = None

    def _stale(self, module: Any, args: Any) -> None:
        self._tokens = None

    def tokens(self, batch: int, rows: slice) -> torch.Tensor:
        """Image tokens (B, n_img, num_tokens, D) for this UNet call, projected once per call."""
        if self._tokens is not None and self._key == (batch, rows.start):
            return self._tokens
        if self.batch_embeds is not None and self.batch_embeds.shape[0] == batch:
            embeds = self.batch_embeds
        else:
            if self.embeds is None or self.negative is None:
                raise StudioError(f"IP-Adapter: no image embeddings for a batch of {batch}.")
            n_uncond = rows.start
            embeds = torch.cat([self.negative.expand(n_uncond, *self.negative.shape[1:]),
                                self.embeds.expand(batch - n_uncond, *self.embeds.shape[1:])])
        proj = self.adapter.projection
        p = next(proj.parameters())
        flat = embeds.reshape(-1, *embeds.shape[2:]).to(p.device, p.dtype)  # (B·n_img, …)
        out = proj(flat)  # (B·n_img, num_tokens, D)
        self._tokens = out.reshape(batch, embeds.shape[1], *out.shape[1:])
        self._key = (batch, rows.start)
        return self._tokens

    def extra(self, store: ConditioningStore, layer: LayerInfo, attn: Any, query: torch.Tensor,
              rows: slice) -> torch.Tensor | None:
        s = self.scale * (self.scales[layer.index] if self.scales is not None else 1.0)
        if s == 0:
            return None
        tokens = self.tokens(query.shape[0], rows)
        return ip_attention(attn, query, tokens.to(query.dtype), self.adapter.to_k_ip[layer.index],
                            self.adapter.to_v_ip[layer.index], self.mask, s)
