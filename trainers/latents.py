"""The training photos, encoded once: VAE posteriors of every example and its mirror (and masks at
latent size), sampled afresh every step by the loop (:mod:`trainers.loop`) and by the probe.

Kept per example, so that examples of different sizes (aspect-ratio buckets, :mod:`trainers.buckets`)
live side by side; a batch — always of one size — is stacked when it is drawn.

**When.** An example is encoded the first time it is needed (``lazy=True``, what the loop asks for):
the first step waits for the examples it draws, not for the whole folder and every class image
(with the probe on, the probe needs every training photo before step 1 anyway). The values are
those of encoding everything up front — each example is one VAE call on itself and its mirror,
whenever it happens — and so is the memory layout (the group tensors are laid out as
``torch.stack`` of the per-example tensors would lay them out).

**Across runs.** With a :class:`LatentStore`, an example's posterior is read from disk when the
same photo (its prepared pixels, byte for byte) was encoded before by the same base (its identity
key: a content fingerprint of a folder or a file, or a hub commit), VAE config and dtype, device kind,
torch and diffusers versions; else it is encoded and written there. The folder is ``$STUDIO_LATENT_CACHE``, else
``$XDG_CACHE_HOME/studio/latents`` (``~/.cache/studio/latents``); ``STUDIO_LATENT_CACHE=off`` turns
it off. Each entry is a small safetensors file (two (2, C, h, w) float32 tensors: 256 KiB at SD 1.5's
512 px); a missing, unreadable or damaged entry is encoded again, an unwritable folder is skipped."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainers.data import Example

CACHE_VERSION = 1
# Identity keys that name the weights' content (studio.models.load_base): a folder's or a file's
# fingerprint, a hub commit. Others (a test's or a benchmark's made-up key, ``builtin:`` random bases
# whose weights follow the torch version) are not cached on disk.
CACHEABLE_IDENTITIES = ("folder:", "file:", "hub:")

Posterior = tuple[torch.Tensor, torch.Tensor]  # (mean, std), each (2, C, h, w) float32: the image and its mirror


@dataclass
class LatentGroup:
    """The examples of one size, stacked: ``mean``/``std`` (n, 2, C, h, w) — each image and its
    mirror; ``masks`` (n, 2, 1, h, w) or None; ``members`` the examples' indices, in order."""

    mean: torch.Tensor
    std: torch.Tensor
    masks: torch.Tensor | None
    members: list[int]


class LatentCache:
    """VAE posteriors of every example and its mirror, stacked per size (one group without buckets:
    the (N, 2, C, h, w) tensors training has always indexed, layout included), each example encoded
    by ``encode`` the first time it is needed.

    Examples are grouped by their prepared pixel size (one latent size each: the VAE maps a size to
    one size, and buckets are multiples of its downsampling factor)."""

    def __init__(self, examples: list[Example], encode: Callable[[Example], Posterior]):
        self.examples, self._encode = examples, encode
        self._any_mask = any(e.mask is not None for e in examples)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, ex in enumerate(examples):
            by_size.setdefault(tuple(ex.pixels.shape), []).append(i)
        self._members = list(by_size.values())
        self._groups: list[LatentGroup | None] = [None] * len(self._members)
        self.where = [(0, 0)] * len(examples)  # example → (group, row in the group)
        for g, members in enumerate(self._members):
            for row, i in enumerate(members):
                self.where[i] = (g, row)
        self._done = [False] * len(examples)

    def __len__(self) -> int:
        return len(self.where)

    @property
    def encoded(self) -> int:
        """How many examples are encoded so far."""
        return sum(self._done)

    @property
    def has_masks(self) -> bool:
        """True when the examples have masks (all ones for an example without one)."""
        return self._any_mask

    @property
    def uniform(self) -> bool:
        """True when every example has the same size (always so without buckets)."""
        return len(self._members) <= 1

    @property
    def groups(self) -> list[LatentGroup]:
        """Every group, every example encoded (encodes what is missing)."""
        self.encode_all()
        return [g for g in self._groups if g is not None]

    def encode_all(self) -> LatentCache:
        """Encode every example not encoded yet (the eager cache)."""
        for i in range(len(self)):
            self._fill(i)
        return self

    def _fill(self, i: int) -> LatentGroup:
        g, row = self.where[i]
        group = self._groups[g]
        if self._done[i]:
            assert group is not None
            return group
        ex = self.examples[i]
        mean, std = self._encode(ex)
        mask = None
        if self._any_mask:
            m = ex.mask if ex.mask is not None else torch.ones_like(ex.pixels[:1])
            mask = F.interpolate(torch.stack([m, m.flip(-1)]), size=mean.shape[-2:], mode="area")
        if group is None:  # laid out as torch.stack of the members' tensors lays them out
            n = len(self._members[g])
            group = LatentGroup(torch.stack([mean] * n), torch.stack([std] * n),
                                torch.stack([mask] * n) if mask is not None else None, self._members[g])
            self._groups[g] = group
        else:
            if tuple(mean.shape) != tuple(group.mean.shape[1:]):
                raise ValueError(f"example {i} encodes to {tuple(mean.shape)}, its size group to "
                                 f"{tuple(group.mean.shape[1:])}")
            group.mean[row] = mean
            group.std[row] = std
            if mask is not None and group.masks is not None:
                group.masks[row] = mask
        self._done[i] = True
        return group

    def shape(self, i: int) -> tuple[int, int, int]:
        """(C, h, w) of example ``i``'s latents (encodes the first example of its size if none is yet)."""
        g, _ = self.where[i]
        group = self._groups[g] or self._fill(i)
        c, h, w = group.mean.shape[2:]
        return int(c), int(h), int(w)

    def _locate(self, idx: torch.Tensor) -> tuple[LatentGroup, torch.Tensor]:
        spots = [self.where[int(i)] for i in idx]
        if len({g for g, _ in spots}) > 1:
            raise ValueError(f"a batch mixes latent sizes {sorted({self.shape(int(i)) for i in idx})}")
        for i in idx:
            self._fill(int(i))
        group = self._groups[spots[0][0]]
        assert group is not None
        return group, torch.tensor([row for _, row in spots], dtype=torch.long)

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


# -- the store across runs ----------------------------------------------------------------------------
def default_store_dir() -> Path | None:
    """``$STUDIO_LATENT_CACHE`` (``off``: no store), else ``$XDG_CACHE_HOME/studio/latents``."""
    explicit = os.environ.get("STUDIO_LATENT_CACHE")
    if explicit is not None and explicit.strip().lower() in ("off", "0", "no", "false", "none"):
        return None
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "studio" / "latents"


class LatentStore:
    """Posteriors on disk, one file per example, keyed by everything the values depend on: the base's
    identity key, the VAE (class, config, dtype), the device kind, the torch and diffusers versions and
    the example's prepared pixels (shape and bytes)."""

    def __init__(self, folder: Path, identity: str, vae: Any, device: torch.device):
        import diffusers

        self.folder = folder
        kind = device.type + (f":{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
        # config.json is not in a folder's fingerprint (its weight files are): a scaling factor edited in place
        # is a new key; "_name_or_path" and the like are not (a folder that moved keeps its entries)
        config = json.dumps({k: v for k, v in dict(getattr(vae, "config", {}) or {}).items() if not k.startswith("_")},
                            sort_keys=True, default=str)
        self.prefix = json.dumps({"identity": identity, "vae": type(vae).__name__, "config": config,
                                  "dtype": str(vae.dtype),
                                  "device": kind, "torch": torch.__version__, "diffusers": diffusers.__version__,
                                  "version": CACHE_VERSION}, sort_keys=True)
        self.hits = self.writes = 0

    @classmethod
    def for_base(cls, base: Any, folder: Path | None = None) -> LatentStore | None:
        """The store of ``base`` (a :class:`~studio.models.BaseModel`), or None when its identity key does
        not name its weights' content or the store is turned off."""
        folder = folder or default_store_dir()
        identity = str(getattr(base, "identity", "") or "")
        if folder is None or not identity.startswith(CACHEABLE_IDENTITIES):
            return None
        return cls(folder, identity, base.pipe.vae, base.device)

    def path(self, ex: Example) -> Path:
        h = hashlib.sha256(self.prefix.encode())
        pixels = ex.pixels.detach().cpu().contiguous()
        h.update(f"{tuple(pixels.shape)}:{pixels.dtype}".encode())
        h.update(pixels.numpy().tobytes())
        return self.folder / f"{h.hexdigest()[:32]}.safetensors"

    def get(self, path: Path) -> Posterior | None:
        """The stored (mean, std) at ``path`` in the strides they were computed with, or None."""
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                out = []
                for name in ("mean", "std"):
                    t = f.get_tensor(name)
                    strides = tuple(json.loads(md[f"{name}_stride"]))
                    # the strides the VAE gave: the UNet's convolutions round by the layout
                    out.append(torch.empty_strided(t.shape, strides, dtype=t.dtype).copy_(t))
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
            return None
        if md.get("key") != self.prefix or not all(torch.isfinite(t).all() for t in out):
            return None
        self.hits += 1
        return out[0], out[1]

    def put(self, path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Write (mean, std) atomically; a folder that cannot be written is skipped."""
        from safetensors.torch import save_file

        from studio.atomic import atomic_path

        md = {"key": self.prefix, "mean_stride": json.dumps(list(mean.stride())),
              "std_stride": json.dumps(list(std.stride()))}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp), metadata=md)
            self.writes += 1
        except OSError:
            pass


def vae_encoder(vae: Any, device: torch.device, dtype: torch.dtype,
                store: LatentStore | None = None) -> Callable[[Example], Posterior]:
    """``example → (mean, std)``, each (2, C, h, w) float32 on the CPU: one VAE call on the example and
    its mirror, scaled (and shifted) as the denoiser sees latents; from/to ``store`` when given."""
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(ex: Example) -> Posterior:
        path = store.path(ex) if store is not None else None
        if store is not None and path is not None:
            hit = store.get(path)
            if hit is not None:
                return hit
        # outside any autocast and without gradients, wherever the loop happens to need it
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            pix = torch.stack([ex.pixels, ex.pixels.flip(-1)]).to(device, dtype)
            dist = vae.encode(pix).latent_dist
            mean = ((dist.mean - shift) * scale).float().cpu()
            std = (dist.std * scale).float().cpu()
        if store is not None and path is not None:
            store.put(path, mean, std)
        return mean, std

    return encode


def encode_examples(vae: Any, examples: list[Example], device: torch.device, dtype: torch.dtype, *,
                    lazy: bool = False, store: LatentStore | None = None) -> LatentCache:
    """Encode each example and its mirror (one VAE call per example, at the example's own size): all
    now, or with ``lazy`` each the first time it is needed; read from / written to ``store`` if given."""
    cache = LatentCache(examples, vae_encoder(vae, device, dtype, store))
    return cache if lazy else cache.encode_all()
