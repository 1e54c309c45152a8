"""The training photos, encoded once: VAE posteriors of every example and its mirror (and masks at
latent size), sampled afresh every step by the loop (:mod:`trainers.loop`) and by the probe.

Kept per example, so that examples of different sizes (aspect-ratio buckets, :mod:`trainers.buckets`)
live side by side; a batch — always of one size — is stacked when it is drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainers.data import Example


@dataclass
class LatentGroup:
    """The examples of one latent size, stacked: ``mean``/``std`` (n, 2, C, h, w) — each image and its
    mirror; ``masks`` (n, 2, 1, h, w) or None; ``members`` the examples' indices, in order."""

    mean: torch.Tensor
    std: torch.Tensor
    masks: torch.Tensor | None
    members: list[int]


class LatentCache:
    """VAE posteriors of every example and its mirror, stacked per latent size (one group without
    buckets: the (N, 2, C, h, w) tensors training has always indexed, layout included)."""

    def __init__(self, means: list[torch.Tensor], stds: list[torch.Tensor], masks: list[torch.Tensor] | None):
        """``means[i]``/``stds[i]`` (2, C, h_i, w_i) and ``masks[i]`` (2, 1, h_i, w_i) of example ``i``."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, m in enumerate(means):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        self.groups = [LatentGroup(torch.stack([means[i] for i in members]), torch.stack([stds[i] for i in members]),
                                   torch.stack([masks[i] for i in members]) if masks is not None else None, members)
                       for members in by_shape.values()]
        self.where = [(0, 0)] * len(means)  # example → (group, row in the group)
        for g, group in enumerate(self.groups):
            for row, i in enumerate(group.members):
                self.where[i] = (g, row)

    def __len__(self) -> int:
        return len(self.where)

    @property
    def has_masks(self) -> bool:
        """True when the examples have masks (all ones for an example without one)."""
        return bool(self.groups) and self.groups[0].masks is not None

    @property
    def uniform(self) -> bool:
        """True when every example has the same latent size (always so without buckets)."""
        return len(self.groups) <= 1

    def shape(self, i: int) -> tuple[int, int, int]:
        """(C, h, w) of example ``i``'s latents."""
        c, h, w = self.groups[self.where[i][0]].mean.shape[2:]
        return int(c), int(h), int(w)

    def _locate(self, idx: torch.Tensor) -> tuple[LatentGroup, torch.Tensor]:
        spots = [self.where[int(i)] for i in idx]
        if len({g for g, _ in spots}) > 1:
            raise ValueError(f"a batch mixes latent sizes {sorted({self.shape(int(i)) for i in idx})}")
        return self.groups[spots[0][0]], torch.tensor([row for _, row in spots], dtype=torch.long)

    def sample(self, idx: torch.Tensor, flips: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Latents ``mean + std · eps`` (B, C, h, w) of examples ``idx`` (B,), mirrored where
        ``flips`` (B,) is 1; every example of the batch must have the same size."""
        group, rows = self._locate(idx)
        return group.mean[rows, flips] + group.std[rows, flips] * eps

    def mask(self, idx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Masks (B, 1, h, w) at latent size (requires :attr:`has_masks`)."""
        group, rows = self._locate(idx)
        if group.masks is None:
            raise ValueError("no example has a mask")
        return group.masks[rows, flips]


@torch.no_grad()
def encode_examples(vae: Any, examples: list[Example], device: torch.device, dtype: torch.dtype) -> LatentCache:
    """Encode each example and its mirror (one VAE call per example, at the example's own size)."""
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
    return LatentCache(means, stds, masks if any_mask else None)
