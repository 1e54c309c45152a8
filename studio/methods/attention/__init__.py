"""One processor per cross-attention layer, shared by every method that needs attention hooks
(:mod:`studio.methods.attention.processor` explains the design; docs/architecture.md, "Attention")."""

from studio.methods.attention.hooks import AttentionHook, ConditioningStore, LayerInfo
from studio.methods.attention.ip import ADOPTED_KEY, DiffusersIPAdapterHook, ip_attention
from studio.methods.attention.processor import (
    StudioCrossAttnProcessor,
    add_hook,
    cfg_layout,
    ensure_installed,
    remove_hook,
    store_of,
    unet_layers,
)

__all__ = ["ADOPTED_KEY", "AttentionHook", "ConditioningStore", "DiffusersIPAdapterHook", "LayerInfo",
           "StudioCrossAttnProcessor", "add_hook", "cfg_layout", "ensure_installed", "ip_attention", "remove_hook",
           "store_of", "unet_layers"]
