"""The training photos, encoded once: VAE posteriors of every example and its mirror (and masks at
latent size), sampled afresh every step by the loop (:mod:`trainers.loop`) and by the probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainers.data import Example


@dataclass
class LatentCache:
    """VAE posteriors of every example and its mirror: mean/std (N, 2, C, h, w); masks (N, 2, 1, h, w)."""

    mean: torch.Tensor
    std: torch.Tensor
    masks: torch.Tensor | None


@torch.no_grad()
def encode_examples(vae: Any, examples: list[Example], device: torch.device, dtype: torch.dtype) -> LatentCache:
    means, stds, masks = [], [], []
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    any_mask = any(e.mask is not None for e in examples)
    for ex in examples:
        pix = torch.stack([ex.pixels, ex.pixels.flip(-1)]).to(device, dtype)
        dist = vae.encode(pix).latent_dist
        means.append(((dist.mean - shift) * scale).float().cpu())
        stds.append((dist.std * scale).float().cpu())
        if any_mask:
            m = ex.mask if ex.mask is not None else torch.ones_like(ex.pixels[:1])
            m = torch.stack([m, m.flip(-1)])
            masks.append(F.interpolate(m, size=means[-1].shape[-2:], mode="area"))
    return LatentCache(torch.stack(means), torch.stack(stds), torch.stack(masks) if any_mask else None)
