"""The two keys of a base model (docs/architecture.md, "Base models").

* **compatibility key** — what a concept needs to apply: the family, the text-encoder widths and
  the UNet's cross-attention layout. A concept trained on SD 1.5 applies to every SD 1.5 fine-tune
  (same key); a 1024-d SD 2 embedding never applies to a 768-d SD 1 model (different key).
* **identity key** — which weights exactly: hub id + revision, or a content fingerprint of the
  weight files. It keys caches (class images, Perfusion's C⁻¹, latents) so two fine-tunes of one
  family never share a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_SAMPLE = 1 << 20  # bytes read at the start, middle and end of each weight file


def cross_attention_layers(unet: Any) -> list[str]:
    """Names of the UNet's cross-attention modules (``attn2``) in execution order.

    ``named_modules`` lists them in registration order, which in diffusers' UNet puts the mid
    block after the up blocks; execution runs down blocks, mid block, then up blocks, so the names
    are ordered by that stage first (stable within a stage, where registration order is numeric).
    """
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    names = [name for name, mod in unet.named_modules()
             if name.endswith("attn2") and getattr(mod, "is_cross_attention", False)]
    return sorted(names, key=lambda n: stage.get(n.split(".", 1)[0], 3))


def compatibility_key(pipe: Any, family: str) -> dict[str, Any]:
    """A JSON-able description of what concepts depend on. Two bases with an equal key accept
    each other's concepts."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    widths = [int(te.config.hidden_size) for te in encoders]
    unet = pipe.unet
    layers = []
    for name in cross_attention_layers(unet):
        attn = unet.get_submodule(name)
        layers.append([int(attn.to_k.in_features), int(attn.to_k.out_features)])
    layout = hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:12]
    return {"family": family, "text_widths": widths, "cross_attention_dim": int(unet.config.cross_attention_dim),
            "n_cross_attention_layers": len(layers), "unet_layout": layout}


def compat_hash(key: dict[str, Any]) -> str:
    """Short stable digest of a compatibility key, for display and file names."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def fingerprint_files(folder: str | os.PathLike[str]) -> str:
    """Content fingerprint of the weight files below ``folder`` (or of one file).

    Hashing multi-GB checkpoints in full at every load would cost seconds to minutes, so each
    file contributes its relative name, its size and three 1 MiB samples (start, middle, end).
    Two different fine-tunes differ in all three samples in practice; the fingerprint is cached
    nowhere, so editing a file changes the key at the next load.
    """
    root = Path(folder)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            for off in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                fh.seek(off)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]
