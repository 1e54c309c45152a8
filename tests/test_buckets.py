"""Aspect-ratio buckets (trainers/buckets.py): the bucket set, assignment, crops, the batch sampler,
SDXL's micro-conditioning, training with buckets on every trainer kind, and buckets off = the old path."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import TrainingError
from trainers import get_trainer
from trainers import loop as loop_module
from trainers.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    bucket_step,
    cover_size,
    crop_offset,
    make_buckets,
)
from trainers.data import load_image_folder
from trainers.loop import TrainCallbacks, TrainControl, TrainingStopped, _hashed_config, load_training_images
from trainers.runner import train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photo(path, w, h, seed):
    """A deterministic textured RGB photo (a gradient plus a block), so crops are distinguishable."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    arr[..., 0] += np.linspace(0, 150, w, dtype=np.uint8)[None, :]
    arr[..., 1] += np.linspace(0, 150, h, dtype=np.uint8)[:, None]
    arr[h // 4: h // 2, w // 4: w // 2] = (20, 20, 220)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Wide, tall and square photos (two of each shape, so buckets hold several images)."""
    d = tmp_path_factory.mktemp("mixed")
    for i, (w, h) in enumerate([(300, 200), (150, 100), (200, 300), (100, 150), (64, 64), (48, 48)]):
        _photo(d / f"{i}.png", w, h, seed=i)
    return d


# -- the bucket set and assignment -----------------------------------------------------------------
@pytest.mark.parametrize("resolution,step", [(32, 4), (512, 64), (1024, 64), (1000, 64), (768, 32)])
def test_bucket_set_properties(resolution, step):
    buckets = make_buckets(resolution, step)
    area = resolution * resolution
    side = resolution // step * step
    assert Bucket(side, side) in buckets
    assert len(set(buckets)) == len(buckets) > 5
    for b in buckets:
        assert b.height % step == 0 and b.width % step == 0
        assert b.height * b.width <= area
        assert 1 / 4 <= b.width / b.height <= 4
        assert Bucket(b.width, b.height) in buckets  # landscape ⇔ portrait
        if b.height != b.width:  # as large as the area allows in one orientation (area ≈ resolution²)
            assert (b.height + step) * b.width > area or (b.width + step) * b.height > area, b
    aspects = [b.width / b.height for b in buckets]
    assert aspects == sorted(aspects)  # tallest first
    assert min(aspects) >= 0.25 and max(aspects) <= 4 and max(aspects) >= 3  # spans the range


def test_sdxl_official_sizes_are_buckets():
    """SDXL's own training sizes (Podell et al. 2023, appendix) are in the 1024/64 set."""
    buckets = make_buckets(1024, 64)
    for h, w in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                 (1536, 640), (640, 1536)]:
        assert Bucket(h, w) in buckets


def _pipe(vae_factor, down_blocks):
    return SimpleNamespace(vae_scale_factor=vae_factor, unet=SimpleNamespace(config=SimpleNamespace(
        down_block_types=("x",) * down_blocks)))


def test_bucket_step_comes_from_the_base(tiny_bases):
    assert bucket_step(_pipe(8, 4), 512) == 64  # SD 1.x: VAE 8 × UNet 8
    assert bucket_step(_pipe(8, 3), 1024) == 64  # SDXL: granularity 32, at least 1024/16
    assert bucket_step(_pipe(8, 3), 512) == 32
    assert bucket_step(_pipe(16, 2), 512) == 32  # a VAE that downsamples 16× (never assume 8)
    assert bucket_step(tiny_bases("tiny").pipe, 32) == 4  # the tiny VAE downsamples 2×, its UNet 2×
    assert bucket_step(_pipe(8, 4), 512, 128) == 128
    with pytest.raises(TrainingError, match="not a multiple of this base's VAE downsampling factor \\(8\\)"):
        bucket_step(_pipe(8, 4), 512, 60)
    with pytest.raises(TrainingError, match="larger than the resolution"):
        bucket_step(_pipe(8, 4), 512, 1024)


def test_assignment_of_wide_tall_and_square_images():
    buckets = make_buckets(32, 4)
    assert assign_bucket(200, 300, buckets) == Bucket(24, 40)  # wide 3:2
    assert assign_bucket(300, 200, buckets) == Bucket(40, 24)  # tall 2:3
    assert assign_bucket(64, 64, buckets) == Bucket(32, 32)
    assert assign_bucket(50, 400, buckets) == Bucket(16, 64)  # 8:1 → the widest bucket (4:1)
    for h, w in [(200, 300), (37, 91), (300, 101), (64, 65)]:  # the nearest aspect in log space
        best = min(abs(math.log(w / h) - b.log_aspect) for b in buckets)
        assert abs(math.log(w / h) - assign_bucket(h, w, buckets).log_aspect) == pytest.approx(best)


def test_cover_and_crop_offsets():
    assert cover_size(200, 300, Bucket(24, 40)) == (27, 40)
    assert cover_size(50, 400, Bucket(16, 64)) == (16, 128)
    assert crop_offset(128, 64) == 32  # centred
    assert crop_offset(128, 64, (40, 80)) == 32  # the subject fits the centred crop: unchanged
    assert crop_offset(128, 64, (112, 128)) == 64  # subject on the right: the crop moves just enough
    assert crop_offset(128, 64, (20, 40)) == 20  # on the left: nearest the centre that still holds it
    assert crop_offset(128, 64, (0, 10)) == 0
    assert crop_offset(128, 64, (10, 120)) == 33  # larger than the crop: centred on the subject


# -- loading -----------------------------------------------------------------------------------------
def test_time_ids_of_a_300x200_image_follow_diffusers(tmp_path):
    """By hand: 300×200 (w×h) → bucket 24×40 (h×w) at 32 px / step 4; resized to cover, 40×27 (w×h),
    scale 40/300; centre crop top (27 − 24) // 2 = 1, left 0. diffusers' order is original_size
    (h, w) + crops_coords_top_left (top, left) + target_size (h, w)."""
    _photo(tmp_path / "a.png", 300, 200, seed=0)
    (ex,) = load_image_folder(tmp_path, 32, buckets=make_buckets(32, 4))
    assert ex.pixels.shape == (3, 24, 40)
    assert ex.time_ids() == (200, 300, 1, 0, 24, 40)
    assert ex.time_ids(flipped=True) == (200, 300, 1, 0, 24, 40)  # full width: the mirror's left is 0 too
    src = Image.open(tmp_path / "a.png").convert("RGB").resize((40, 27), Image.Resampling.BICUBIC)
    want = torch.from_numpy(np.asarray(src.crop((0, 1, 40, 25)), dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1
    assert torch.equal(ex.pixels, want)


def test_the_mirror_crop_is_measured_in_the_mirrored_image(tmp_path):
    """200×300 (w×h) → bucket 40×24 (h×w): resized 27×40, crop left (27 − 24) // 2 = 1; the mirror
    image's crop (diffusers flips before it crops) starts at 27 − 1 − 24 = 2."""
    _photo(tmp_path / "a.png", 200, 300, seed=1)
    (ex,) = load_image_folder(tmp_path, 32, buckets=make_buckets(32, 4))
    assert ex.time_ids() == (300, 200, 0, 1, 40, 24)
    assert ex.time_ids(flipped=True) == (300, 200, 0, 2, 40, 24)
    resized = Image.open(tmp_path / "a.png").convert("RGB").resize((27, 40), Image.Resampling.BICUBIC)
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((2, 0, 26, 40))
    want = torch.from_numpy(np.asarray(mirrored, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1
    assert torch.equal(ex.pixels.flip(-1), want)


def test_the_mask_keeps_the_subject_in_the_crop_and_follows_the_image(tmp_path):
    """An 8:1 strip with the subject (alpha) at its right end: a centred crop would cut it out."""
    rgba = Image.new("RGBA", (400, 50), (0, 0, 0, 0))
    rgba.paste((250, 10, 10, 255), (350, 5, 398, 45))
    rgba.save(tmp_path / "a.png")
    (ex,) = load_image_folder(tmp_path, 32, buckets=make_buckets(32, 4))
    assert ex.pixels.shape == (3, 16, 64) and ex.mask is not None and ex.mask.shape == (1, 16, 64)
    assert ex.time_ids() == (50, 400, 0, 64, 16, 64)  # resized 128×16, crop moved right to hold the subject
    on = ex.mask[0] > 0.5
    assert on.sum() > 0
    red = ex.pixels[0][on].mean()  # the mask and the pixels were cut alike: under the mask it is red
    assert red > 0.5 and ex.pixels[0][~on].mean() > 0.5 and ex.pixels[1][on].mean() < -0.5


# -- the sampler -----------------------------------------------------------------------------------
def test_sampler_batches_stay_in_one_bucket_and_cover_each_epoch():
    keys = ["a"] * 5 + ["b"] * 3 + ["c"]
    s = BucketBatchSampler(keys, batch_size=2, seed=7)
    assert s.per_epoch == 3 + 2 + 1
    for epoch in range(4):
        batches = s.epoch(epoch)
        assert all(len(b) == 2 and len({keys[i] for i in b}) == 1 for b in batches)
        seen = [i for b in batches for i in b]
        assert set(seen) == set(range(len(keys)))  # every image once (+ fillers from its own bucket)
        assert len(seen) - len(keys) == 1 + 1 + 1  # a: 5 → 6, b: 3 → 4, c: 1 → 2
    again = BucketBatchSampler(keys, batch_size=2, seed=7)
    assert [again.batch(k) for k in range(20)] == [s.batch(k) for k in range(20)]  # a function of (seed, k)
    other = BucketBatchSampler(keys, batch_size=2, seed=8)
    assert [other.batch(k) for k in range(20)] != [s.batch(k) for k in range(20)]
    assert s.epoch(0) != s.epoch(1)  # reshuffled every epoch


# -- training --------------------------------------------------------------------------------------
class _Recorder:
    """Records every UNet call's latents shape and ``time_ids`` once training has started."""

    def __init__(self, unet):
        self.on, self.calls = False, []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.on:
            added = kwargs.get("added_cond_kwargs") or {}
            tid = added.get("time_ids")
            self.calls.append((args[0].detach().clone(), None if tid is None else tid.detach().clone()))

    def callbacks(self):
        rec = self

        class Start(TrainCallbacks):
            def on_start(self, total_steps, start_step):
                rec.on = True

        return Start()

    def close(self):
        self.handle.remove()


@pytest.fixture
def record_sampler(monkeypatch):
    """Every batch the loop's sampler hands out, with the example sizes it was built from."""
    seen: list[tuple[list[int], list]] = []

    class Recording(BucketBatchSampler):
        def __init__(self, keys, batch_size, seed):
            super().__init__(keys, batch_size, seed)
            self.on_batch = lambda batch: seen.append((list(batch), list(keys)))

    monkeypatch.setattr(loop_module, "BucketBatchSampler", Recording)
    return seen


def _assert_one_bucket_per_batch(seen):
    assert seen
    for batch, keys in seen:
        assert len({keys[i] for i in batch}) == 1, (batch, keys)
    assert len({seen[0][1][b[0]] for b, _ in seen}) >= 2  # several buckets were trained


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_textual_inversion_trains_with_buckets(tiny_bases, mixed, tmp_path, record_sampler, family):
    base = tiny_bases(family)
    cfg = get_trainer("textual-inversion").resolve(images=str(mixed), out=str(tmp_path / "c.safetensors"),
                                                   class_word="cat", steps=3, batch_size=2, lr=5e-2, log_every=0,
                                                   seed=0, buckets=True)
    rec = _Recorder(base.pipe.unet)
    try:
        res = train(get_trainer("textual-inversion"), cfg, base, callbacks=rec.callbacks())
    finally:
        rec.close()
    assert all(math.isfinite(x) for x in res.losses) and res.path.is_file()
    assert res.concept.train["buckets"] is True
    _assert_one_bucket_per_batch(record_sampler)
    assert len({tuple(x.shape[-2:]) for x, _ in rec.calls}) >= 2  # training (and the probe) in several buckets
    if family == "tiny-sdxl":  # each row its own image's size and crop, at latent size × 2 = its bucket
        examples = load_training_images(cfg, base)
        allowed = {ex.time_ids(f) for ex in examples for f in (False, True)}
        for x, tid in rec.calls:
            for row in tid.tolist():
                assert tuple(int(v) for v in row) in allowed
                assert (int(row[4]), int(row[5])) == (x.shape[-2] * 2, x.shape[-1] * 2)
        assert any(int(r[0]) != int(r[1]) for _, tid in rec.calls for r in tid.tolist())  # not all square


def test_dreambooth_lora_trains_with_buckets_and_prior(tiny_bases, mixed, tmp_path, record_sampler):
    """The class images (square, generated) and a non-square bucket differ in size: two UNet calls per
    step then, the class call with the class images' square micro-conditioning."""
    base = tiny_bases("tiny-sdxl")
    entry = get_trainer("dreambooth")
    cfg = entry.resolve(images=str(mixed), out=str(tmp_path / "l.safetensors"), class_word="dog", steps=3, lr=3e-2,
                        log_every=0, seed=0, num_class_images=2, class_steps=1, class_batch_size=2,
                        class_cache_dir=str(tmp_path / "cls"), train_text_encoder=False, batch_size=2, buckets=True,
                        probe=False)
    rec = _Recorder(base.pipe.unet)
    try:
        res = train(entry, cfg, base, callbacks=rec.callbacks())
    finally:
        rec.close()
    assert all(math.isfinite(x) for x in res.losses) and res.path.is_file()
    _assert_one_bucket_per_batch(record_sampler)
    square = [tid for x, tid in rec.calls if tuple(x.shape[-2:]) == (16, 16)]
    assert square and any(tuple(x.shape[-2:]) != (16, 16) for x, _ in rec.calls)
    assert any(torch.equal(t, torch.tensor([[32, 32, 0, 0, 32, 32]] * len(t), dtype=t.dtype)) for t in square)


def test_dreambooth_lora_on_sd1_with_buckets(tiny, mixed, tmp_path, record_sampler):
    entry = get_trainer("dreambooth")
    cfg = entry.resolve(images=str(mixed), out=str(tmp_path / "l.safetensors"), class_word="dog", steps=2, lr=3e-2,
                        log_every=0, seed=0, num_class_images=2, class_steps=1, class_batch_size=2,
                        class_cache_dir=str(tmp_path / "cls"), batch_size=2, buckets=True)
    res = train(entry, cfg, tiny)
    assert all(math.isfinite(x) for x in res.losses) and res.path.is_file()
    assert "verdict" in res.concept.metrics  # the probe measured per bucket
    _assert_one_bucket_per_batch(record_sampler)


def test_resume_with_buckets_is_bit_identical(tiny, mixed, tmp_path):
    entry = get_trainer("textual-inversion")

    def cfg(out, **kw):
        return entry.resolve(images=str(mixed), out=str(out), class_word="cat", steps=3, batch_size=2, lr=5e-2,
                             log_every=0, seed=0, buckets=True, probe=False, **kw)

    whole = train(entry, cfg(tmp_path / "a.safetensors"), tiny)

    class PauseAfterOne(TrainControl):
        def poll(self):
            return "pause"

    out = tmp_path / "b.safetensors"
    with pytest.raises(TrainingStopped) as stop:
        train(entry, cfg(out), tiny, control=PauseAfterOne())
    assert stop.value.step == 1 and stop.value.checkpoint is not None
    resumed = train(entry, cfg(out, resume="latest"), tiny)
    for k, v in whole.concept.tensors.items():
        assert torch.equal(v, resumed.concept.tensors[k]), k
    assert resumed.losses == whole.losses[1:]


# -- buckets off: exactly the old path ---------------------------------------------------------------
def _old_square(path, size):
    """The square path as it always was: shorter side resized to ``size`` (bicubic), centre crop."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1


def test_buckets_off_trains_on_exactly_the_old_tensors(tiny_bases, mixed, tmp_path):
    """Square crops, the old draw order from the seeded generator, latents indexed from the stacked
    cache and ``time_ids = [R, R, 0, 0, R, R]``: the UNet's first input is rebuilt bit for bit."""
    from diffusers import DDPMScheduler

    from trainers.templates import TEMPLATES

    base = tiny_bases("tiny-sdxl")
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(mixed), out=str(tmp_path / "c.safetensors"), class_word="cat", steps=1,
                        batch_size=2, lr=5e-2, log_every=0, seed=3, probe=False, init="cross")
    assert cfg.buckets is False and "buckets" not in _hashed_config(cfg)  # old checkpoints' hashes still match
    examples = load_training_images(cfg, base)
    for ex in examples:
        assert torch.equal(ex.pixels, _old_square(ex.path, 32)) and ex.time_ids() == (32, 32, 0, 0, 32, 32)
    rec = _Recorder(base.pipe.unet)
    try:
        train(entry, cfg, base, callbacks=rec.callbacks())
    finally:
        rec.close()
    (got, tid), = rec.calls
    # the old loop, by hand
    vae = base.pipe.vae
    with torch.no_grad():
        dists = [vae.encode(torch.stack([ex.pixels, ex.pixels.flip(-1)])).latent_dist for ex in examples]
    mean = torch.stack([d.mean * vae.config.scaling_factor for d in dists])
    std = torch.stack([d.std * vae.config.scaling_factor for d in dists])
    rng = torch.Generator().manual_seed(3)
    idx = torch.randint(len(examples), (2,), generator=rng)
    flips = torch.randint(2, (2,), generator=rng)
    torch.randint(len(TEMPLATES["object"]), (2,), generator=rng)
    t = torch.randint(1000, (2,), generator=rng)
    eps = torch.randn((2, 4, 16, 16), generator=rng)
    noise = torch.randn((2, 4, 16, 16), generator=rng)
    latents = mean[idx, flips] + std[idx, flips] * eps
    noisy = DDPMScheduler.from_config(base.pipe.scheduler.config).add_noise(latents, noise, t)
    assert torch.equal(got, noisy)
    assert got.stride() == noisy.stride()  # the VAE's channels-last layout too: the UNet's convs round by it
    assert torch.equal(tid, torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=tid.dtype))


def test_mixed_sizes_without_buckets_are_refused(tiny, mixed, tmp_path):
    from trainers.loop import run_training

    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(mixed), out=str(tmp_path / "c.safetensors"), class_word="cat", steps=1,
                        batch_size=2, lr=5e-2, log_every=0, probe=False)
    bucketed = load_image_folder(mixed, 32, buckets=make_buckets(32, 4))
    with pytest.raises(TrainingError, match="different sizes; train them with --buckets"):
        run_training(tiny, entry.make_trainer(tiny, cfg, "<cat-x>"), cfg, method=entry.method, examples=bucketed,
                     save=False)
    with pytest.raises(TrainingError, match="bucket_step must be ≥ 0"):
        entry.resolve(images=str(mixed), class_word="cat", bucket_step=-4)
