"""Zero-shot concepts and IP-Adapter (docs/methods.md §6): parity with diffusers' own loader and
processors, concepts vs reference images, strength, composition, the adapter trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from studio.errors import IncompatibleConceptError, StudioError
from studio.generation import GenerateConfig, applied, effective_strengths, generate
from studio.methods import get_method
from studio.methods.attention import AttentionHook, StudioCrossAttnProcessor, add_hook, remove_hook, store_of
from studio.methods.zeroshot import EMBEDS, make_zeroshot_concept
from studio.methods.zeroshot.adapter import build_adapter, published_state, read_adapter_state, resolve_adapter
from studio.prompts import rewrite
from tests.conftest import render
from tests.method_cases import (
    make_perfusion,
    make_zeroshot,
    reference_image,
    save_tiny_adapter,
    tiny_adapter_folder,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Toy models run fastest on one thread (and a busy machine makes two threads spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fresh_bases():
    """Private tiny bases: diffusers' ``load_ip_adapter`` mutates the pipeline it loads into."""
    from studio.models import load_base

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_base(name, device="cpu")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def fresh_tiny(fresh_bases):
    return fresh_bases("tiny")


def _ours(base, concept, prompt="a photo of a cat", strength=1.0, steps=1, **kw):
    h = get_method("zeroshot").apply(base, concept, strength=strength)
    try:
        from studio.methods.attention import cfg_layout

        with cfg_layout(base.pipe.unet, guided=True):
            return render(base, prompt, steps=steps, **kw)
    finally:
        h.remove()


@pytest.mark.parametrize("family,kind", [("tiny", "base"), ("tiny", "plus"), ("tiny-sdxl", "base"),
                                         ("tiny-sdxl", "plus")])
def test_adapter_round_trip_and_parity_with_diffusers(fresh_bases, tmp_path, family, kind):
    """Weights saved in the published layout load through diffusers' ``load_ip_adapter``; the
    studio's hook renders what diffusers' ``IPAdapterAttnProcessor2_0`` renders (SD 1 and SDXL
    pipelines, base and plus projections); the writer reproduces the file."""
    fresh_tiny = fresh_bases(family)
    pipe, unet = fresh_tiny.pipe, fresh_tiny.pipe.unet
    folder = save_tiny_adapter(tmp_path / kind, unet, kind, seed=3)
    flat = read_adapter_state(folder / "ip_adapter.safetensors")
    ours = build_adapter(unet, flat)
    written = published_state(unet, ours)
    from safetensors.torch import load_file

    original = load_file(str(folder / "ip_adapter.safetensors"))
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)

    img = reference_image(5)
    concept = make_zeroshot_concept([img], str(folder), name="ref")
    assert concept.tensors[EMBEDS].ndim == (3 if kind == "plus" else 2)
    mine = _ours(fresh_tiny, concept)

    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors")
    try:
        theirs_proj = unet.encoder_hid_proj.image_projection_layers[0].state_dict()
        assert all(torch.equal(theirs_proj[k], v) for k, v in ours.projection.state_dict().items())
        gen = torch.Generator().manual_seed(0)
        theirs = pipe(prompt="a photo of a cat", num_inference_steps=1, generator=gen, output_type="np",
                      guidance_scale=5.0, ip_adapter_image=img).images[0]
    finally:
        pipe.unload_ip_adapter()
        pipe.image_encoder, pipe.feature_extractor = None, None
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_diffusers_loaded_adapter_keeps_working_under_studio_processors(fresh_tiny, tmp_path):
    """``pipe.load_ip_adapter`` then a studio hook: the studio processors replace diffusers' IP
    processors but carry their image attention (masks and per-adapter scale included); the IP
    processors come back when the hook leaves."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    pipe, unet = fresh_tiny.pipe, fresh_tiny.pipe.unet
    folder = save_tiny_adapter(tmp_path / "a", unet, "base", seed=4)
    mask = Image.fromarray(np.tile((np.arange(32) < 16).astype("uint8") * 255, (32, 1)))
    masks = IPAdapterMaskProcessor().preprocess([mask], height=32, width=32)
    masks = [masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])]
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors")
    try:
        pipe.set_ip_adapter_scale(0.7)
        ip_procs = dict(unet.attn_processors)

        def run(**kw):
            gen = torch.Generator().manual_seed(1)
            return pipe(prompt="a cat", num_inference_steps=1, generator=gen, output_type="np", guidance_scale=5.0,
                        ip_adapter_image=reference_image(6), **kw).images[0]

        plain_ip, masked_ip = run(), run(cross_attention_kwargs={"ip_adapter_masks": masks})
        add_hook(unet, "probe", AttentionHook())
        try:
            assert all(isinstance(p, StudioCrossAttnProcessor) for k, p in unet.attn_processors.items() if "attn2" in k)
            np.testing.assert_allclose(run(), plain_ip, atol=1e-5)
            np.testing.assert_allclose(run(cross_attention_kwargs={"ip_adapter_masks": masks}), masked_ip, atol=1e-5)
        finally:
            remove_hook(unet, "probe")
        assert store_of(unet) is None and all(unet.attn_processors[k] is p for k, p in ip_procs.items())
        assert np.abs(masked_ip - plain_ip).max() > 1e-4
    finally:
        pipe.unload_ip_adapter()
        pipe.image_encoder, pipe.feature_extractor = None, None


def test_concept_equals_passing_the_image_and_strength(tiny, library, tmp_path):
    """A concept made from one image (saved, reloaded: no encoder pass) renders exactly what the image
    passed directly renders; scale 0 is exactly the plain pipeline; another image changes the output."""
    folder = tiny_adapter_folder(tiny)
    img_path = tmp_path / "ref.png"
    reference_image(11).save(img_path)
    other_path = tmp_path / "other.png"
    reference_image(12).save(other_path)
    from studio.service import Studio

    studio = Studio(base=tiny, library=library.folder)
    saved = studio.create_zeroshot([str(img_path)], str(folder), name="dog", class_word="dog")
    assert saved.stat().st_size < 20_000
    cfg = dict(prompt="a photo of <dog> on a beach", steps=1, guidance=5.0, seed=2)
    with_concept = studio.generate(GenerateConfig(**cfg, concepts=[{"source": "dog"}]))[0]
    plain_cfg = dict(cfg, prompt="a photo of dog on a beach")
    direct = generate(tiny, GenerateConfig(**plain_cfg, reference_images=[str(img_path)], adapter=str(folder)))[0]
    assert np.array_equal(np.asarray(with_concept), np.asarray(direct))
    assert json.loads(direct.info["studio"])["reference_images"] == [str(img_path)]

    plain = generate(tiny, GenerateConfig(**plain_cfg))[0]
    off = generate(tiny, GenerateConfig(**plain_cfg, reference_images=[str(img_path)], adapter=str(folder),
                                        reference_scale=0.0))[0]
    assert np.array_equal(np.asarray(off), np.asarray(plain))
    assert not np.array_equal(np.asarray(direct), np.asarray(plain))
    other = generate(tiny, GenerateConfig(**plain_cfg, reference_images=[str(other_path)], adapter=str(folder)))[0]
    assert not np.array_equal(np.asarray(other), np.asarray(direct))
    assert store_of(tiny.pipe.unet) is None  # nothing left installed


def test_scale_is_monotonic_and_layer_scales_select_blocks(tiny):
    from dataclasses import replace

    c = make_zeroshot(tiny, "<zz>", 7)
    plain = render(tiny, steps=1)
    half, full = _ours(tiny, c, strength=0.5), _ours(tiny, c, strength=1.0)
    assert 0 < np.abs(half - plain).mean() < np.abs(full - plain).mean()
    none = dict(c.meta, **{"zeroshot.layer_scales": json.dumps({"down": 0.0, "up": 0.0})})
    h = get_method("zeroshot").apply(tiny, replace(c, meta=none), strength=1.0)
    try:  # every block off: the hook adds nothing anywhere
        assert h.hook.scales == [0.0] * len(store_of(tiny.pipe.unet).layers)
    finally:
        h.remove()
    up_only = dict(c.meta, **{"zeroshot.layer_scales": json.dumps({"up": {"block_0": [0.0, 1.0]}})})
    some = _ours(tiny, replace(c, meta=up_only))
    assert np.abs(some - plain).max() > 1e-4 and np.abs(some - full).max() > 1e-4


def test_composes_with_perfusion_keeping_both_effects(tiny):
    """Perfusion (edit_kv) and the zero-shot image attention (extra) run in the same processors in
    the same UNet call; removing either changes the image."""
    p, z = make_perfusion(tiny, "<pp>", 1), make_zeroshot(tiny, "<zz>", 2)
    prompt = "a photo of <pp> next to <zz>"

    calls: dict[str, list[int]] = {"edit_kv": [], "extra": []}

    def run(concepts, probe=False):
        resolved = effective_strengths(prompt, "", [(c, None, c.name) for c in concepts])
        with applied(tiny, resolved) as texts:
            text = rewrite(prompt, {**{c.trigger: c.class_word for c in (p, z)}, **texts})
            if not probe:
                return render(tiny, text, steps=1)
            return probed(text)

    only_p, only_z = run([p]), run([z])

    def probed(text):
        store = store_of(tiny.pipe.unet)
        perf = next(h for k, h in store.hooks.items() if not k.startswith("zeroshot"))
        ip = store.hooks["zeroshot:<zz>"]
        orig_kv, orig_extra = perf.edit_kv, ip.extra

        def kv(st, layer, attn, ck, cv, key, value, rows):
            k2, v2 = orig_kv(st, layer, attn, ck, cv, key, value, rows)
            if not torch.equal(v2, value):
                calls["edit_kv"].append(layer.index)
            return k2, v2

        def extra(st, layer, attn, query, rows):
            out = orig_extra(st, layer, attn, query, rows)
            if out is not None and out.abs().max() > 0:
                calls["extra"].append(layer.index)
            return out

        perf.edit_kv, ip.extra = kv, extra
        try:
            from studio.methods.attention import cfg_layout

            with cfg_layout(tiny.pipe.unet, guided=True):
                return render(tiny, text, steps=1), len(store.layers)
        finally:
            del perf.edit_kv, ip.extra

    both, n = run([p, z], probe=True)
    assert np.abs(both - only_p).max() > 1e-3 and np.abs(both - only_z).max() > 1e-3
    assert sorted(set(calls["edit_kv"])) == list(range(n)) and sorted(set(calls["extra"])) == list(range(n))


def test_errors_are_clear(tiny_bases, tmp_path):
    with pytest.raises(StudioError, match="insightface"):
        resolve_adapter("sd15-faceid")
    with pytest.raises(StudioError, match="neither a preset"):
        resolve_adapter(str(tmp_path / "missing.safetensors"))
    faceid = {"image_proj.proj.0.weight": torch.zeros(8, 4), "image_proj.proj.2.weight": torch.zeros(32, 8),
              "image_proj.norm.weight": torch.zeros(8), "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8)}
    from studio.methods.zeroshot.adapter import save_adapter_file

    save_adapter_file(tmp_path / "faceid.safetensors", faceid)
    with pytest.raises(StudioError, match="insightface"):
        make_zeroshot_concept([reference_image(0)], str(tmp_path / "faceid.safetensors"), image_encoder=str(tmp_path))
    sdxl_concept = make_zeroshot(tiny_bases("tiny-sdxl"), "<xl>", 0)  # 64-d tokens, another layer count
    with pytest.raises(IncompatibleConceptError, match="another model family"):
        get_method("zeroshot").apply(tiny_bases("tiny"), sdxl_concept, strength=1.0)
    with pytest.raises(StudioError, match="only matter with --reference-image"):
        GenerateConfig(prompt="x", adapter="sd15")


def test_train_adapter_writes_a_folder_diffusers_loads(tiny, fresh_tiny, tmp_path):
    from trainers import get_trainer
    from trainers.runner import train

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        reference_image(20 + i).save(images / f"{i}.png")
    (images / "0.txt").write_text("a photo of a cat")
    entry = get_trainer("adapter")
    start = tiny_adapter_folder(tiny)
    cfg = entry.resolve(images=str(images), adapter=str(start), out=str(tmp_path / "out"), steps=3, lr=1e-2,
                      batch_size=2)
    result = train(entry, cfg, tiny)
    assert result.path == tmp_path / "out" and store_of(tiny.pipe.unet) is None
    before, after = (read_adapter_state(f / "ip_adapter.safetensors") for f in (start, result.path))
    assert after.keys() == before.keys()
    assert any(not torch.equal(before["ip_adapter"][k], after["ip_adapter"][k]) for k in before["ip_adapter"])
    assert all(p.requires_grad for p in tiny.pipe.unet.parameters()) or not any(
        p.requires_grad for p in tiny.pipe.unet.parameters())
    # diffusers reads the folder as published (image encoder included)
    pipe = fresh_tiny.pipe
    pipe.load_ip_adapter(str(result.path), subfolder="", weight_name="ip_adapter.safetensors")
    try:
        assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is not None
    finally:
        pipe.unload_ip_adapter()
        pipe.image_encoder, pipe.feature_extractor = None, None
    # and the studio uses it as an adapter
    c = make_zeroshot_concept([reference_image(3)], str(result.path), name="t")
    assert json.loads(c.meta["zeroshot.adapter"])["file"].endswith("ip_adapter.safetensors")


def test_mask_limits_where_the_reference_acts(tiny, tmp_path):
    from dataclasses import replace

    from PIL import Image

    from studio.methods.zeroshot import MASK

    c = make_zeroshot(tiny, "<mm>", 8)
    left = np.tile((np.arange(48) < 24).astype("uint8") * 255, (48, 1))
    Image.fromarray(left).save(tmp_path / "left.png")
    Image.fromarray(left * 0).save(tmp_path / "none.png")
    from studio.methods.zeroshot.adapter import mask_tensor

    masked = replace(c, tensors={**c.tensors, MASK: mask_tensor(Image.open(tmp_path / "left.png"))})
    nowhere = replace(c, tensors={**c.tensors, MASK: mask_tensor(Image.open(tmp_path / "none.png"))})
    plain, full = render(tiny, steps=1), _ours(tiny, c)
    np.testing.assert_array_equal(_ours(tiny, nowhere), plain)
    half = _ours(tiny, masked)
    assert np.abs(half - plain).max() > 1e-4 and np.abs(half - full).max() > 1e-4


def test_cli_create_zeroshot_and_generate_with_a_reference(tiny, tmp_path, capsys):
    from studio.cli import main
    from studio.methods import load_concept

    folder = tiny_adapter_folder(tiny)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        reference_image(30 + i).save(refs / f"{i}.png")
    out = tmp_path / "dog.safetensors"
    assert main(["concepts", "create-zeroshot", "--images", str(refs), "--adapter", str(folder), "--out", str(out),
                 "--average", "--scale", "0.8", "--class-word", "dog"]) == 0
    c = load_concept(out)
    assert c.method == "zeroshot" and c.tensors[EMBEDS].shape[0] == 1 and c.strength == 0.8 and c.trigger == "<refs>"
    png = tmp_path / "img.png"
    assert main(["generate", "--base", "tiny", "--prompt", "a photo of a dog", "--steps", "1", "--reference-image",
                 str(refs / "0.png"), "--adapter", str(folder), "--out", str(png)]) == 0
    assert png.is_file()
    assert main(["generate", "--base", "tiny", "--prompt", "a dog", "--steps", "1", "--reference-image",
                 str(refs / "0.png"), "--adapter", "sd15-faceid", "--out", str(png)]) == 2
    assert "insightface" in capsys.readouterr().err
