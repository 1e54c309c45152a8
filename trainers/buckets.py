"""Aspect-ratio buckets (``--buckets``): each training image is trained near its own aspect ratio.

Without buckets every image is resized (shorter side) and centre-cropped to a square
``resolution × resolution`` (:mod:`trainers.data`), so a wide or tall photo loses its sides. With
buckets (the scheme of kohya's sd-scripts and SDXL's training, Podell et al. 2023, §2.3):

* **the bucket set** (:func:`make_buckets`): every ``(height, width)`` whose sides are multiples of
  ``step`` pixels, whose area is at most ``resolution²`` (for each width the tallest height that
  fits, so the area stays close to it) and whose aspect ratio is within [1/4, 4];
* **assignment** (:func:`assign_bucket`): each image goes to the bucket of nearest aspect ratio
  in log space (``|log(w/h) − log(W/H)|``; ties → the larger bucket);
* **fit** (:func:`cover_size`, :func:`crop_offset`): resized to cover the bucket, then cropped to
  it — centred, or, when the image has a mask, placed so that the mask's bounding box stays inside
  the crop whenever it fits (the crop nearest the centre that holds it);
* **batches** (:class:`BucketBatchSampler`): drawn within one bucket, never mixing two.

``step`` must be a multiple of the base's VAE downsampling factor (latent sides are whole);
:func:`bucket_step` derives a default from the base (never assuming a factor of 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from studio.errors import TrainingError

MAX_ASPECT = 4.0  # buckets span aspect ratios (width / height) from 1/4 to 4


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size in pixels: ``height × width`` (both multiples of the bucket step)."""

    height: int
    width: int

    @property
    def log_aspect(self) -> float:
        """``log(width / height)``: 0 for a square, > 0 for a landscape bucket."""
        return math.log(self.width / self.height)


def scale_factors(pipe: Any) -> tuple[int, int]:
    """``(vae, unet)``: the VAE's downsampling factor (``pipe.vae_scale_factor``, else from the VAE's
    blocks) and the denoiser's own — the UNet's 2 per down block but the last, a flow transformer's patch
    size (FLUX: at least its 2×2 packing) — so latent sides that are multiples of ``unet`` keep every
    feature map (or patch) whole."""
    vae = getattr(pipe, "vae_scale_factor", None)
    if not vae:
        vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    denoiser = getattr(pipe, "transformer", None)
    if denoiser is not None:  # SD 3 / FLUX: latents are cut into patch_size² tokens (FLUX packs 2×2)
        unet = int(getattr(denoiser.config, "patch_size", 1) or 1)
        if base_family(pipe) == "flux":
            unet = max(unet, 2)
    else:
        unet = 2 ** max(0, len(pipe.unet.config.down_block_types) - 1)
    return int(vae), int(unet)


def base_family(pipe: Any) -> str:
    """``"flux"`` for a FLUX pipeline (its latents are packed 2×2 whatever the transformer's patch size)."""
    return "flux" if type(pipe).__name__.startswith("Flux") else ""


def bucket_step(pipe: Any, resolution: int, step: int = 0) -> int:
    """The bucket side multiple in pixels for ``pipe`` at ``resolution``.

    ``step > 0`` is the user's (``--bucket-step``) and must be a multiple of the VAE's downsampling
    factor and at most ``resolution``. ``0`` derives one: the smallest multiple of the base's latent
    granularity (VAE factor × UNet downsampling) that is at least ``resolution / 16`` — 64 px for
    SD 1.x at 512 and for SDXL at 1024 (granularity 32), 4 px on the 32-px tiny test bases."""
    vae, unet = scale_factors(pipe)
    if step < 0:
        raise TrainingError(f"bucket_step must be ≥ 0 (0 = derived from the base), got {step}.")
    if step:
        if step % vae:
            raise TrainingError(f"--bucket-step {step} is not a multiple of this base's VAE downsampling factor "
                                f"({vae}); use a multiple of {vae * unet} (or 0 to derive it).")
        if step > resolution:
            raise TrainingError(f"--bucket-step {step} is larger than the resolution {resolution}; use a smaller "
                                "step (or 0 to derive it).")
        return step
    grain = vae * unet
    return max(grain, math.ceil(resolution / 16 / grain) * grain)


def make_buckets(resolution: int, step: int, *, max_aspect: float = MAX_ASPECT) -> list[Bucket]:
    """Every bucket for ``resolution`` (sorted by aspect ratio, tallest first).

    For each width ``w`` (a multiple of ``step``) the bucket is ``(h, w)`` with ``h`` the largest
    multiple of ``step`` such that ``h · w ≤ resolution²``; kept when ``1/max_aspect ≤ w/h ≤
    max_aspect``. The set is symmetric (``(h, w)`` in it ⇔ ``(w, h)`` in it) and holds the square
    bucket ``s × s`` with ``s = ⌊resolution / step⌋ · step``."""
    if step < 1 or resolution < step:
        raise TrainingError(f"Buckets need 1 ≤ step ≤ resolution, got step {step} at resolution {resolution}.")
    area = resolution * resolution
    side = resolution // step * step
    found: set[Bucket] = {Bucket(side, side)}
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step + 1, step):
        h = (area // w) // step * step
        if h >= step and 1 / max_aspect <= w / h <= max_aspect:
            found.add(Bucket(h, w))
            found.add(Bucket(w, h))
    # keep, per aspect ratio, only the largest bucket (two widths can round to the same ratio)
    best: dict[tuple[int, int], Bucket] = {}
    for b in found:
        g = math.gcd(b.height, b.width)
        key = (b.height // g, b.width // g)
        if key not in best or b.height * b.width > best[key].height * best[key].width:
            best[key] = b
    return sorted(best.values(), key=lambda b: (b.log_aspect, -b.height * b.width))


def assign_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket of nearest aspect ratio to an ``height × width`` image (log-ratio distance; on a
    tie the larger bucket, then the wider)."""
    if not buckets:
        raise TrainingError("No buckets to assign the image to.")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(b.log_aspect - target), 12), -b.height * b.width, -b.width))


def cover_size(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """``(h, w)`` of the image resized (aspect kept) to cover ``bucket``: both sides ≥ the bucket's,
    one of them equal to it."""
    scale = max(bucket.height / height, bucket.width / width)
    return max(bucket.height, round(height * scale)), max(bucket.width, round(width * scale))


def crop_offset(length: int, size: int, subject: tuple[int, int] | None = None) -> int:
    """Where a crop of ``size`` starts along a side of ``length`` (``0 ≤ offset ≤ length − size``).

    Centred (``(length − size) // 2``) unless ``subject = (start, end)`` (the mask's bounding box on
    this side, end exclusive) would not fit in it: then the offset nearest the centre that keeps
    the whole subject inside; a subject longer than ``size`` gets a crop centred on it."""
    room = length - size
    if room < 0:
        raise ValueError(f"crop of {size} does not fit in {length}")
    centre = room // 2
    if subject is None:
        return centre
    start, end = subject
    lo, hi = max(0, end - size), min(start, room)
    if lo <= hi:
        return min(max(centre, lo), hi)
    return min(max((start + end - size) // 2, 0), room)


class BucketBatchSampler:
    """Global batches of example indices, each drawn from one bucket: deterministic for a seed and
    a pure function of the batch's number, so a resumed run draws exactly what an uninterrupted one
    would (the loop passes ``step · grad_accum + micro_step``; nothing needs checkpointing).

    An *epoch* visits every example once: each bucket's examples are shuffled and cut into batches
    of ``batch_size``, and the batches of all buckets are shuffled together (numpy's generator
    seeded with ``(seed, epoch)``). A bucket whose last batch would be short — or that holds fewer
    images than ``batch_size`` — fills it with more of its own images, taken again from the start of
    its shuffled order: batches never mix buckets and always have ``batch_size`` rows, so the
    learning rate means the same in every step and ``accelerate``'s per-process slices stay whole
    (the repeated images get their own flips, timesteps and noise). ``on_batch``, when set, is
    called with each batch drawn (tests use it to watch the buckets)."""

    def __init__(self, keys: list[Any], batch_size: int, seed: int):
        if batch_size < 1 or not keys:
            raise ValueError("BucketBatchSampler needs batch_size ≥ 1 and at least one example")
        self.batch_size, self.seed = batch_size, int(seed)
        self.groups: list[list[int]] = []  # example indices per bucket, buckets in sorted key order
        by_key: dict[Any, list[int]] = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
        self.groups = [by_key[k] for k in sorted(by_key)]
        self.per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.on_batch: Any = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` in the order they are trained."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng([self.seed & (2**63 - 1), int(epoch)])
        batches: list[list[int]] = []
        for group in self.groups:
            order = [group[int(i)] for i in rng.permutation(len(group))]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                while len(batch) < self.batch_size:  # fill from the same bucket, never from another
                    batch += order[:self.batch_size - len(batch)]
                batches.append(batch)
        batches = [batches[int(i)] for i in rng.permutation(len(batches))]
        self._epoch = (epoch, batches)
        return batches

    def batch(self, number: int) -> list[int]:
        """The ``number``-th batch of the run (0-based, counted over epochs)."""
        if number < 0:
            raise ValueError(f"batch number must be ≥ 0, got {number}")
        drawn = self.epoch(number // self.per_epoch)[number % self.per_epoch]
        if self.on_batch is not None:
            self.on_batch(drawn)
        return list(drawn)
