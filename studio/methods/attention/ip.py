"""Image attention of IP-Adapter (Ye et al. 2023, eq. 5; docs/methods.md §6) inside the shared processor.

:func:`ip_attention` computes one adapter's decoupled image attention as diffusers'
``IPAdapterAttnProcessor2_0`` does; :class:`DiffusersIPAdapterHook` is the *passive* hook that keeps
the image attention of diffusers' own IP-Adapter processors running when the studio's processors
replace them (a user called ``pipe.load_ip_adapter``). The studio's own adapters (zero-shot concepts,
``--reference-image``) live in :mod:`studio.methods.zeroshot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.methods.attention.hooks import AttentionHook, ConditioningStore, LayerInfo

ADOPTED_KEY = "ip:diffusers"


def ip_attention(attn: Any, query: torch.Tensor, tokens: torch.Tensor, to_k_ip: nn.Module, to_v_ip: nn.Module,
                 mask: torch.Tensor | None = None, scales: Sequence[float] | float = 1.0) -> torch.Tensor:
    """Image attention of one adapter, as diffusers' ``IPAdapterAttnProcessor2_0`` computes it.

    query: (B, N, inner); tokens: (B, n_img, T_ip, D) — without a mask all images' tokens form one
    key sequence; with ``mask`` (1, n_img, H, W) each image attends separately and is weighted by
    its mask resized to the layer's ``N`` positions. Returns ``Σ scale · attention`` (B, N, inner).
    """
    b, heads = query.shape[0], attn.heads
    head_dim = query.shape[-1] // heads
    q = query.view(b, -1, heads, head_dim).transpose(1, 2)  # (B, h, N, d)

    def one(tok: torch.Tensor) -> torch.Tensor:
        k = to_k_ip(tok).view(b, -1, heads, head_dim).transpose(1, 2)  # (B, h, T, d)
        v = to_v_ip(tok).view(b, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)

    if mask is None:
        s = scales if isinstance(scales, (int, float)) else scales[0]
        return s * one(tokens)
    from diffusers.image_processor import IPAdapterMaskProcessor

    n_img = mask.shape[1]
    s_list = [float(scales)] * n_img if isinstance(scales, (int, float)) else list(scales)
    total = None
    for i in range(n_img):
        out = one(tokens[:, i])
        m = IPAdapterMaskProcessor.downsample(mask[:, i], b, out.shape[1], out.shape[2]).to(query.device, query.dtype)
        term = s_list[i] * (out * m)
        total = term if total is None else total + term
    assert total is not None  # the mask has a channel per image, at least one
    return total


class DiffusersIPAdapterHook(AttentionHook):
    """Passive stand-in for diffusers' IP-Adapter processors that the studio processors replaced:
    their weights, scales and ``ip_adapter_masks`` act on the image tokens the UNet's
    ``encoder_hid_proj`` made (``store.extra["ip_tokens"]``), every row (diffusers' pipelines put
    the negative image embeddings in the unconditional rows themselves)."""

    passive = True

    def extra(self, store: ConditioningStore, layer: LayerInfo, attn: Any, query: torch.Tensor,
              rows: slice) -> torch.Tensor | None:
        proc = store.original.get(f"{layer.name}.processor")
        tokens = store.extra.get("ip_tokens")
        if proc is None or not hasattr(proc, "to_k_ip") or not tokens:
            return None
        masks = store.extra.get("ip_masks")
        if masks is not None and not isinstance(masks, list):
            masks = list(masks.unsqueeze(1))
        masks = masks or [None] * len(tokens)
        total = None
        for tok, scale, k, v, mask in zip(tokens, proc.scale, proc.to_k_ip, proc.to_v_ip, masks):
            if (isinstance(scale, list) and all(s == 0 for s in scale)) or scale == 0:
                continue
            out = ip_attention(attn, query, tok.to(query.dtype), k, v, mask, scale)
            total = out if total is None else total + out
        return total


def adopt_diffusers_ip_adapter(store: ConditioningStore) -> None:
    """Called by :func:`~studio.methods.attention.ensure_installed` when it replaced processors
    that own IP-Adapter weights: keep their image attention running (idempotent)."""
    if ADOPTED_KEY not in store.hooks:
        store.hooks[ADOPTED_KEY] = DiffusersIPAdapterHook()
