"""The two keys of a base model (docs/architecture.md, "Base models").

* **compatibility key** — what a concept needs to apply: the family, the text-encoder widths and
  the UNet's cross-attention layout. A concept trained on SD 1.5 applies to every SD 1.5 fine-tune
  (same key); a 1024-d SD 2 embedding never applies to a 768-d SD 1 model (different key). For the
  flow transformers (SD 3 / FLUX) the layout is the transformer's: its attention projections'
  names and shapes, its text and pooled input widths (:func:`flow_compatibility_key`).
* **identity key** — which weights exactly: hub id + revision, or a content fingerprint of the
  weight files. It keys caches (class images, Perfusion's C⁻¹, latents) so two fine-tunes of one
  family never share a cache.

And the full sha256 of a single-file checkpoint (:func:`file_sha256`), which A1111 shows as the
"Model hash" of a generation (its first 10 hex digits), remembered on disk because it reads the
whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from studio.atomic import atomic_path
from studio.errors import StudioError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_SAMPLE = 1 << 20  # bytes read at the start, middle and end of each weight file
_HASH_CHUNK = 8 << 20
_HASH_CACHE_MAX = 8 << 20  # a hash cache larger than this is not ours to parse: it is ignored (and rewritten)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        return flow_compatibility_key(pipe, family)
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


def flow_compatibility_key(pipe: Any, family: str) -> dict[str, Any]:
    """The key of an SD 3 / FLUX base: family, CLIP widths, the transformer's text-context and pooled
    widths, its block counts and a digest of its attention projections (name, in, out).

    T5 is deliberately left out of ``text_widths``: SD 3 may run without it (``text_encoder_3=None``),
    and a concept (a LoRA on the transformer, an embedding on a CLIP) fits such a base all the same;
    its width is fixed by ``joint_attention_dim`` anyway. FLUX.1-dev and -schnell differ only in the
    guidance embedder, which no concept touches, so they share a key (dev LoRAs apply to schnell).
    """
    clips = [te for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
             if te is not None and type(te).__name__.startswith("CLIP")]
    widths = [int(te.config.hidden_size) for te in clips]
    net = pipe.transformer
    layers = [[name, int(mod.in_features), int(mod.out_features)] for name, mod in net.named_modules()
              if ".attn" in name and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj")
              and hasattr(mod, "in_features")]
    layout = hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:12]
    cfg = net.config
    return {"family": family, "text_widths": widths, "joint_attention_dim": int(cfg.joint_attention_dim),
            "pooled_projection_dim": int(cfg.pooled_projection_dim),
            "n_transformer_blocks": int(cfg.num_layers) + int(cfg.get("num_single_layers", 0) or 0),
            "transformer_layout": layout}


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


def hash_cache_file() -> Path:
    """Where :func:`file_sha256` remembers hashes: ``$STUDIO_HASH_CACHE``, else
    ``$XDG_CACHE_HOME/studio/hashes.json`` (``~/.cache/studio/hashes.json``)."""
    explicit = os.environ.get("STUDIO_HASH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "studio" / "hashes.json"


def file_sha256(path: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> str:
    """The sha256 (64 hex digits) of a whole file — what A1111 hashes a checkpoint with.

    Reading a multi-GB checkpoint takes seconds, so the digest is remembered in ``cache`` (default
    :func:`hash_cache_file`), keyed by the file's resolved path, size and modification time: a file
    changed since is hashed again. A missing, unreadable or damaged cache costs a re-hash, never an
    error; a cache that cannot be written is skipped."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = Path(cache).expanduser() if cache is not None else hash_cache_file()
    entries = _read_hash_cache(cache_file)
    hit = entries.get(str(p))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and _SHA256.fullmatch(str(hit.get("sha256", ""))):
        return str(hit["sha256"])
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    entries[str(p)] = {"stamp": stamp, "sha256": digest}
    try:
        with atomic_path(cache_file) as tmp:
            Path(tmp).write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
    except (OSError, StudioError):
        pass  # a read-only or full cache folder only means hashing again next time
    return digest


def _read_hash_cache(cache_file: Path) -> dict[str, Any]:
    try:
        if cache_file.stat().st_size > _HASH_CACHE_MAX:
            return {}
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
