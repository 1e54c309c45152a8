"""Start-up before the first optimizer step: latents encoded when first needed and kept across runs
(:mod:`trainers.latents`), the measured init's loss reused for the starting gain, the class images a
run uses loaded alone — each giving exactly what the eager path gave."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.buckets import make_buckets
from trainers.data import load_image_folder
from trainers.latents import LatentCache, LatentStore, encode_examples, vae_encoder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Five photos of three aspect ratios, two with an alpha mask."""
    d = tmp_path_factory.mktemp("startup_mixed")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(48, 32), (32, 48), (40, 40), (56, 32), (32, 32)]):
        a = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        a[..., 3] = 255
        if i % 2:
            a[: h // 3, :, 3] = 0
        Image.fromarray(a, "RGBA").save(d / f"m{i}.png")
    return d


def _examples(folder: Path):
    return load_image_folder(folder, 32, buckets=make_buckets(32, 4))


def _counting(vae, calls: list[int]):
    real = vae_encoder(vae, torch.device("cpu"), vae.dtype)

    def encode(ex):
        calls.append(1)
        return real(ex)

    return encode


def test_lazy_cache_gives_the_eager_values_and_layout(tiny_bases, mixed):
    vae = tiny_bases("tiny-sdxl").pipe.vae
    examples = _examples(mixed)
    eager = encode_examples(vae, examples, torch.device("cpu"), vae.dtype)
    calls: list[int] = []
    lazy = LatentCache(examples, _counting(vae, calls))
    assert lazy.uniform is False and lazy.has_masks and not calls  # told from the pixels: nothing encoded
    # one example drawn: one VAE call; its group is laid out as the eager one
    idx, flips = torch.tensor([3]), torch.tensor([1])
    eps = torch.randn((1, *eager.shape(3)), generator=torch.Generator().manual_seed(0))
    got = lazy.sample(idx, flips, eps)
    assert len(calls) == 1 and lazy.encoded == 1
    want = eager.sample(idx, flips, eps)
    assert torch.equal(got, want) and got.stride() == want.stride()
    # every example, in a scrambled order: the same values, masks and strides as encoding all up front
    for i in [4, 0, 2, 1, 3]:
        one, f = torch.tensor([i]), torch.tensor([i % 2])
        e = torch.randn((1, *eager.shape(i)), generator=torch.Generator().manual_seed(i))
        assert torch.equal(lazy.sample(one, f, e), eager.sample(one, f, e))
        assert torch.equal(lazy.mask(one, f), eager.mask(one, f))
    assert len(calls) == len(examples)  # each example encoded once
    for a, b in zip(lazy.groups, eager.groups):
        assert a.members == b.members
        for x, y in ((a.mean, b.mean), (a.std, b.std), (a.masks, b.masks)):
            assert torch.equal(x, y) and x.stride() == y.stride()
    with pytest.raises(ValueError, match="mixes latent sizes"):
        lazy.sample(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.zeros(2, 4, 4, 4))


def test_store_round_trip_is_exact_and_skips_the_vae(tiny_bases, mixed, tmp_path, monkeypatch):
    base = tiny_bases("tiny-sdxl")
    vae = base.pipe.vae
    examples = _examples(mixed)
    store = LatentStore(tmp_path / "latents", "folder:0123456789abcdef", vae, torch.device("cpu"))
    cold = encode_examples(vae, examples, torch.device("cpu"), vae.dtype, store=store)
    assert store.writes == len(examples) and store.hits == 0
    monkeypatch.setattr(type(vae), "encode", lambda *a, **k: pytest.fail("the VAE ran on a warm store"))
    again = LatentStore(tmp_path / "latents", "folder:0123456789abcdef", vae, torch.device("cpu"))
    warm = encode_examples(vae, examples, torch.device("cpu"), vae.dtype, store=again)
    assert again.hits == len(examples)
    for a, b in zip(warm.groups, cold.groups):
        for x, y in ((a.mean, b.mean), (a.std, b.std)):
            assert torch.equal(x, y) and x.stride() == y.stride()  # the VAE's layout is restored


def test_store_keys_and_damage(tiny_bases, mixed, tmp_path, monkeypatch):
    base = tiny_bases("tiny")
    vae = base.pipe.vae
    ex = load_image_folder(mixed, 32)[0]
    a = LatentStore(tmp_path, "folder:aaaa", vae, torch.device("cpu"))
    b = LatentStore(tmp_path, "folder:bbbb", vae, torch.device("cpu"))
    assert a.path(ex) != b.path(ex)  # another base: another entry
    other = load_image_folder(mixed, 32)[1]
    assert a.path(ex) != a.path(other)
    rescaled = copy.deepcopy(vae)
    rescaled.register_to_config(scaling_factor=0.5)  # a config.json edited in place: same weights, other latents
    assert LatentStore(tmp_path, "folder:aaaa", rescaled, torch.device("cpu")).path(ex) != a.path(ex)
    # a damaged entry is encoded again (and rewritten), never an error
    encode = vae_encoder(vae, torch.device("cpu"), vae.dtype, a)
    mean, std = encode(ex)
    a.path(ex).write_bytes(b"not a safetensors file")
    again = encode(ex)
    assert torch.equal(again[0], mean) and a.hits == 0 and a.writes == 2
    # which bases are cached: load_base's content keys only (a random tiny base's weights follow torch)
    assert base.identity.startswith("builtin:") and LatentStore.for_base(base, tmp_path) is None
    monkeypatch.setenv("STUDIO_LATENT_CACHE", "off")
    named = dataclasses.replace(base, identity="folder:cafe")
    assert LatentStore.for_base(named) is None
    monkeypatch.setenv("STUDIO_LATENT_CACHE", str(tmp_path / "here"))
    store = LatentStore.for_base(named)
    assert store is not None and store.folder == tmp_path / "here"


def test_starting_gain_reuses_the_measured_init_exactly(tiny, tmp_path):
    from tests.helpers import write_photos
    from trainers import get_trainer
    from trainers.latents import encode_examples as enc
    from trainers.loop import _gain_at_start, _templates, load_training_images
    from trainers.probe import DenoisingProbe

    write_photos(tmp_path / "photos", n=3)
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(tmp_path / "photos"), out=str(tmp_path / "c.safetensors"), class_word="cat",
                        steps=1, log_every=0, seed=0, init="auto")
    examples = load_training_images(cfg, tiny)
    trainer = entry.make_trainer(tiny, cfg, "<cat-x>")
    try:
        assert len(trainer.candidates) > 1
        from diffusers import DDPMScheduler

        probe = DenoisingProbe(tiny.pipe, enc(tiny.pipe.vae, examples, tiny.device, tiny.pipe.vae.dtype, lazy=True),
                               DDPMScheduler.from_config(tiny.pipe.scheduler.config), examples, _templates(cfg.templates),
                               class_text="cat", resolution=32, seed=0)
        trainer.choose_init(probe, lambda message: None)
        assert trainer.start_loss is not None and trainer.start_loss[0] is probe
        assert _gain_at_start(probe, trainer) == probe.gain(trainer)  # bit-equal: the same loss, not re-measured
        other = DenoisingProbe(tiny.pipe, probe.cache, probe.scheduler, examples, _templates(cfg.templates),
                               class_text="cat", resolution=32, seed=1)
        assert _gain_at_start(other, trainer) == other.gain(trainer)  # another probe: measured afresh
    finally:
        trainer.teardown()


def test_class_prior_loads_only_the_images_it_uses(tiny, tmp_path):
    from tests.helpers import dreambooth_config, write_square_photos
    from trainers.lora import class_image_folder, class_prior

    cfg = dreambooth_config(write_square_photos(tmp_path / "photos"), tmp_path / "c.safetensors", tmp_path / "cache",
                            num_class_images=2)
    folder = class_image_folder(tiny, cfg.class_text(), 32, cfg.class_cache_dir)
    folder.mkdir(parents=True)
    for i in range(4):  # an earlier run asked for four
        Image.new("RGB", (32, 32), (10 * i, 80, 120)).save(folder / f"class-{i:05d}.png")
    prior = class_prior(tiny, cfg, 32)
    assert prior is not None and [e.path.name for e in prior.examples] == ["class-00000.png", "class-00001.png"]
