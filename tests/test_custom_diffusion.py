"""Custom Diffusion: the concept file, apply/remove through the shared processor, composition with
other methods, the closed-form merge, the diffusers export (rendered by plain diffusers), and the trainer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from studio.concept import GUARD_TENSOR
from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods import export_concept, get_method, load_concept, save_concept
from studio.methods.attention import store_of, unet_layers
from studio.methods.custom_diffusion import EMBEDDINGS, K_NAME, V_NAME, kv_layers
from studio.methods.custom_diffusion.merge import caption_features, merge_concepts, regularization_captions
from studio.methods.runtime import token_table
from tests.conftest import render
from tests.method_cases import make_custom_diffusion, make_lora, make_ti

CD = get_method("custom_diffusion")
PROMPT = "a photo of <aa> on the grass"  # "<aa>" reads as "<aa> cat" (the modifier + class noun)


def _apply_render(base, concepts, prompt=PROMPT, strengths=None):
    """Apply ``concepts`` (each at its strength), render ``prompt`` with every trigger rewritten, remove all."""
    from studio.prompts import rewrite

    handles = []
    try:
        for i, c in enumerate(concepts):
            handles.append(get_method(c.method).apply(base, c, strength=(strengths or [1.0] * len(concepts))[i]))
        return render(base, rewrite(prompt, {h.concept.trigger: h.prompt_text() for h in handles}))
    finally:
        for h in reversed(handles):
            h.remove()


def _state(pipe):
    return ({k: id(v) for k, v in pipe.unet.attn_processors.items()}, len(pipe.tokenizer),
            id(pipe.text_encoder.get_input_embeddings()), store_of(pipe.unet))


# -- the file ------------------------------------------------------------------------------------------------
def test_round_trip_keeps_every_tensor_and_marks_the_file(tiny, tmp_path):
    from safetensors import safe_open

    c = make_custom_diffusion(tiny, "<aa>", 0)
    path = save_concept(c, tmp_path / "c.safetensors")
    back = load_concept(path)
    assert back.tokens == ["<aa>"] and back.class_word == "cat" and back.method == "custom_diffusion"
    assert set(back.tensors) == set(c.tensors)
    for k, v in c.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    with safe_open(str(path), "pt") as f:
        assert next(iter(f.keys())) == GUARD_TENSOR  # embedding loaders skip the file
    layers = unet_layers(tiny.pipe.unet)
    assert set(kv_layers(back.tensors)) == {layer.name for layer in layers}  # every cross-attention layer, by name


@pytest.mark.parametrize("edit", ["drop-v", "wrong-shape", "two-embeddings", "class-words"])
def test_validate_refuses_malformed_concepts(tiny, edit):
    c = make_custom_diffusion(tiny, "<aa>", 0)
    name = unet_layers(tiny.pipe.unet)[0].name
    if edit == "drop-v":
        del c.tensors[V_NAME.format(name)]
    elif edit == "wrong-shape":
        c.tensors[K_NAME.format(name)] = c.tensors[K_NAME.format(name)][:, :-1]
    elif edit == "two-embeddings":
        c.tensors[EMBEDDINGS[0]] = torch.cat([c.tensors[EMBEDDINGS[0]]] * 2)
    else:
        c.meta["custom_diffusion.class_words"] = json.dumps(["cat", "dog"])
    with pytest.raises(ConceptFormatError):
        CD.validate(c)


def test_check_base_refuses_another_family_and_unknown_layers(tiny_bases):
    sd, xl = tiny_bases("tiny"), tiny_bases("tiny-sdxl")
    with pytest.raises(IncompatibleConceptError):
        CD.check_base(make_custom_diffusion(sd, "<aa>", 0), xl)
    c = make_custom_diffusion(sd, "<aa>", 0)
    name = unet_layers(sd.pipe.unet)[0].name
    c.tensors[K_NAME.format("up_blocks.9.attn2")] = c.tensors.pop(K_NAME.format(name))
    c.tensors[V_NAME.format("up_blocks.9.attn2")] = c.tensors.pop(V_NAME.format(name))
    with pytest.raises(IncompatibleConceptError, match="up_blocks.9.attn2"):
        CD.check_base(c, sd)


# -- apply / remove / strength -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_apply_changes_kv_exactly_and_remove_restores(tiny_bases, family):
    base = tiny_bases(family)
    before, plain = _state(base.pipe), render(base, "a photo of cat on the grass")
    c = make_custom_diffusion(base, "<aa>", 1)
    h = CD.apply(base, c, strength=0.5)
    try:
        layer = unet_layers(base.pipe.unet)[-1]
        attn = base.pipe.unet.get_submodule(layer.name)
        hook = store_of(base.pipe.unet).hooks["custom_diffusion:<aa>"]
        ctx = torch.randn(2, 5, layer.context_dim)
        key, value = hook.edit_kv(store_of(base.pipe.unet), layer, attn, ctx, ctx, attn.to_k(ctx), attn.to_v(ctx),
                                  slice(1, 2))
        wk, wv = kv_layers(c.tensors)[layer.name]
        w0k, w0v = attn.to_k.weight.detach(), attn.to_v.weight.detach()
        torch.testing.assert_close(key, ctx @ (w0k + 0.5 * (wk - w0k)).T, atol=1e-5, rtol=1e-5)  # W₀ + s·ΔW, all rows
        torch.testing.assert_close(value, ctx @ (w0v + 0.5 * (wv - w0v)).T, atol=1e-5, rtol=1e-5)
        assert h.prompt_text() == "<aa> cat"
    finally:
        h.remove()
    assert _state(base.pipe) == before
    np.testing.assert_array_equal(render(base, "a photo of cat on the grass"), plain)


def test_strength_zero_is_bit_identical_to_the_base_and_strength_grows(tiny):
    c = make_custom_diffusion(tiny, "<aa>", 2)
    off = _apply_render(tiny, [c], strengths=[0.0])
    np.testing.assert_array_equal(off, render(tiny, "a photo of cat on the grass"))
    assert store_of(tiny.pipe.unet) is None and not token_table(tiny.pipe).entries
    d = [np.abs(_apply_render(tiny, [c], strengths=[s]) - _apply_render(tiny, [c], strengths=[1e-6])).max()
         for s in (0.5, 1.0)]
    assert 1e-4 < d[0] < d[1]


def test_composes_with_lora_and_ti_and_each_removal_is_exact(tiny):
    cd, lora, ti = make_custom_diffusion(tiny, "<aa>", 3), make_lora(tiny, "<bb>", 4), make_ti(tiny, "<cc>", 5)
    prompt = "a photo of <aa> with <bb> and <cc> on the grass"
    state = _state(tiny.pipe)
    all3 = _apply_render(tiny, [lora, ti, cd], prompt)
    for pair in ([lora, ti], [ti, cd], [lora, cd]):
        text = prompt
        for c in (cd, lora, ti):
            text = text if c in pair else text.replace(c.trigger, "cat")
        assert np.abs(all3 - _apply_render(tiny, pair, text)).max() > 1e-3
    assert _state(tiny.pipe) == state
    # ΔW comes from the base weight under the LoRA: applying the LoRA first, then removing it, leaves CD alone.
    from studio.prompts import rewrite

    alone = _apply_render(tiny, [cd])
    hl = get_method("lora").apply(tiny, lora, strength=1.0)
    hc = CD.apply(tiny, cd, strength=1.0)
    hl.remove()
    try:
        np.testing.assert_allclose(render(tiny, rewrite(PROMPT, {"<aa>": hc.prompt_text()})), alone, atol=1e-6)
    finally:
        hc.remove()
    assert _state(tiny.pipe) == state


def test_two_concepts_stack_and_one_cannot_be_applied_twice(tiny):
    a, b = make_custom_diffusion(tiny, "<aa>", 6), make_custom_diffusion(tiny, "<bb>", 7)
    ha = CD.apply(tiny, a, strength=1.0)
    try:
        with pytest.raises(StudioError, match="already applied"):
            CD.apply(tiny, a, strength=1.0)
        hb = CD.apply(tiny, b, strength=1.0)
        assert set(store_of(tiny.pipe.unet).hooks) == {"custom_diffusion:<aa>", "custom_diffusion:<bb>"}
        hb.remove()
    finally:
        ha.remove()
    assert store_of(tiny.pipe.unet) is None


# -- the closed-form merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_merge_reproduces_each_concept_on_its_tokens_and_stays_near_the_base(tiny_bases, family):
    base = tiny_bases(family)
    a, b = make_custom_diffusion(base, "<aa>", 8), make_custom_diffusion(base, "<bb>", 9)
    b.class_word = "dog"
    captions = regularization_captions(300)
    merged, report = merge_concepts(base, [a, b], name="ab", captions=captions)
    assert merged.tokens == ["<aa>", "<bb>"] and json.loads(merged.meta["custom_diffusion.class_words"]) == ["cat", "dog"]
    CD.validate(merged)
    # the constraint: W* c = W_n c on each concept's own token features (recomputed here, independently)
    from studio.methods.custom_diffusion.merge import target_features

    table = token_table(base.pipe)
    table.set("t", merged.tokens, [merged.tensors[k] for k in EMBEDDINGS if k in merged.tensors])
    try:
        feats = {"<aa>": target_features(base.pipe, "<aa>", "cat"), "<bb>": target_features(base.pipe, "<bb>", "dog")}
    finally:
        table.drop("t")
    c_reg = caption_features(base.pipe, regularization_captions(300, seed=1))  # held-out captions
    reg_fit = caption_features(base.pipe, captions)  # the captions the merge used
    unet = base.pipe.unet
    for layer, (wk, wv) in kv_layers(merged.tensors).items():
        attn = unet.get_submodule(layer)
        for j, w in enumerate((wk, wv)):
            w0 = (attn.to_k if j == 0 else attn.to_v).weight.detach().double()
            for concept, tok in ((a, "<aa>"), (b, "<bb>")):
                wn = kv_layers(concept.tensors)[layer][j].double()
                target = feats[tok] @ wn.T
                err = (feats[tok] @ w.double().T - target).norm() / target.norm()
                assert err < 1e-6, (layer, j, tok, float(err))
            # near the base on held-out captions: closer than either concept alone
            change = ((w.double() - w0) @ c_reg.T).norm()
            alone = min(((kv_layers(c.tensors)[layer][j].double() - w0) @ c_reg.T).norm() for c in (a, b))
            assert change < alone, (layer, j, float(change), float(alone))
            # and the closest of all weights that meet the constraints: a step in their null space costs more
            t = torch.cat([feats["<aa>"], feats["<bb>"]])
            p = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(j))
            p = p - (p @ t.T) @ torch.linalg.pinv(t @ t.T) @ t  # P tᵀ = 0
            assert float((p @ t.T).abs().max()) < 1e-8
            base_cost = (((w.double() - w0) @ reg_fit.T) ** 2).sum()
            for eps in (1e-3, -1e-3):
                assert (((w.double() + eps * p - w0) @ reg_fit.T) ** 2).sum() > base_cost
    assert max(report.target_residual.values()) < 1e-6


def test_merge_cli_writes_a_library_concept(tiny, tmp_path, monkeypatch):
    import studio.service
    from studio.cli import main
    from studio.library import Library

    lib = Library(tmp_path / "lib")
    lib.add(make_custom_diffusion(tiny, "<aa>", 10), "a")
    lib.add(make_custom_diffusion(tiny, "<bb>", 11), "b")
    monkeypatch.setattr(studio.service.Studio, "base", property(lambda self: tiny))
    monkeypatch.setattr("studio.methods.custom_diffusion.merge.DEFAULT_REG_CAPTIONS", 200)
    assert main(["concepts", "merge", "a", "b", "--out", "ab", "--base", "tiny", "--library", str(tmp_path / "lib")]) == 0
    merged = lib.load("ab")
    assert merged.method == "custom_diffusion" and merged.tokens == ["<aa>", "<bb>"]
    assert main(["concepts", "merge", "a", "--out", "x", "--base", "tiny", "--library", str(tmp_path / "lib")]) == 2
    # the merged concept renders with both of its tokens in one prompt (each reads "<tok> class")
    from studio.generation import ConceptUse, GenerateConfig
    from studio.models import BaseSettings
    from studio.service import Studio

    studio = Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny)
    images = studio.generate(GenerateConfig(prompt="a photo of <aa> next to <bb>", steps=2, concepts=[ConceptUse("ab")]))
    assert len(images) == 1 and "<aa>" in images[0].info["parameters"]


# -- export to diffusers: rendered by plain diffusers --------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_diffusers_export_renders_what_the_studio_renders(tiny_bases, tmp_path, family):
    from studio.methods.custom_diffusion.files import WEIGHT_NAME
    from studio.models import load_base

    base = tiny_bases(family)
    c = make_custom_diffusion(base, "<aa>", 12)
    folder = export_concept(c, tmp_path / "cd", "diffusers")
    state = torch.load(folder / WEIGHT_NAME, weights_only=True)  # tensors and empty dicts only
    assert sum(isinstance(v, dict) for v in state.values()) == len(unet_layers(base.pipe.unet))
    ours = _apply_render(base, [c])
    plain = load_base(family, device="cpu")  # a second copy of the same weights, used as plain diffusers
    pipe = copy.copy(plain.pipe)
    # diffusers 0.42.1 installs the loaded processors only when it is told the pipeline (``_pipeline``):
    # without it load_attn_procs returns silently and the base renders (the check below would catch it).
    pipe.unet.load_attn_procs(str(folder), weight_name=WEIGHT_NAME, _pipeline=pipe)
    assert len({type(p).__name__ for p in pipe.unet.attn_processors.values()} - {"CustomDiffusionAttnProcessor"}) == 0
    info = json.loads((folder / "studio_custom_diffusion.json").read_text())
    for token, name in zip(info["tokens"], info["token_files"]):
        if getattr(pipe, "text_encoder_2", None) is None:
            pipe.load_textual_inversion(str(folder / name), token=token)
        else:
            from safetensors.torch import load_file

            emb = load_file(str(folder / name))
            pipe.load_textual_inversion(emb["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(emb["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    gen = torch.Generator().manual_seed(0)
    theirs = pipe(prompt="a photo of <aa> cat on the grass", num_inference_steps=2, generator=gen, output_type="np",
                  guidance_scale=5.0).images[0]
    # the same model: only the attention kernels differ (diffusers' processor: softmax(QKᵀ)V by bmm; ours: SDPA)
    np.testing.assert_allclose(theirs, ours, atol=2e-5)
    assert np.abs(ours - render(base, "a photo of cat on the grass")).max() > 1e-3


# -- the trainer ---------------------------------------------------------------------------------------------
def test_trainer_learns_kv_and_token_and_leaves_the_pipeline_clean(tiny, tmp_path):
    from PIL import Image

    from trainers import get_trainer
    from trainers.runner import train

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(photos / f"{i}.png")
    entry = get_trainer("custom-diffusion")
    cfg = entry.resolve(images=str(photos), class_word="cat", steps=3, lr=1e-2, token_lr=1e-2, num_class_images=2,
                        class_steps=1, class_cache_dir=str(tmp_path / "cls"), out=str(tmp_path / "c.safetensors"),
                        log_every=0, budget="fixed")
    state = _state(tiny.pipe)
    weights = {k: v.clone() for k, v in tiny.pipe.unet.state_dict().items()}
    result = train(entry, cfg, tiny)
    assert _state(tiny.pipe) == state
    assert all(torch.equal(v, tiny.pipe.unet.state_dict()[k]) for k, v in weights.items())
    concept = load_concept(result.path)
    assert concept.tokens == ["<new1>"] and concept.method == "custom_diffusion"
    moved = [float((wk - tiny.pipe.unet.get_submodule(n).to_k.weight).abs().max())
             for n, (wk, _) in kv_layers(concept.tensors).items()]
    assert len(moved) == len(unet_layers(tiny.pipe.unet)) and min(moved) > 0
    assert concept.train["lr_effective"] == [0.01, 0.01]
    out = _apply_render(tiny, [concept], "a photo of <new1> cat")
    assert out.shape[-1] == 3


def test_default_rate_is_the_papers_on_sd15():
    from trainers.custom_diffusion import SD15_KV_FAN_IN, CustomDiffusionConfig

    cfg = CustomDiffusionConfig(class_word="cat")
    assert cfg.lr is None and cfg.batch_size == 2 and cfg.scale_lr
    assert cfg.lr_scale / SD15_KV_FAN_IN == pytest.approx(1e-5)  # per sample; × batch 2 = 2e-5 (diffusers --scale_lr)


# -- the random-scale augmentation ---------------------------------------------------------------------------
def test_scale_draws_follow_the_official_pipeline():
    from trainers.custom_diffusion import SHRINK_PREFIXES, ZOOM_PREFIXES, draw_scale, scale_outcomes

    # 512 px: the shrink branch (2/3) draws 343 sides in [170, 512], 137 of them (≤ 306, rounded up to even)
    # below 0.6 × 512; the zoom branch (1/3) always enlarges
    assert scale_outcomes(512) == pytest.approx({"shrink": 2 / 3 * 137 / 343, "keep": 2 / 3 * 206 / 343,
                                                 "zoom": 1 / 3})
    size, n = 64, 3000
    gen = torch.Generator().manual_seed(0)
    draws = [draw_scale(size, gen) for _ in range(n)]
    for d in draws:
        assert d.side % 2 == 0
        if d.kind == "shrink":
            assert 22 <= d.side < 0.6 * size and d.prefix in SHRINK_PREFIXES
            assert 0 <= d.top <= size - d.side and 0 <= d.left <= size - d.side
        elif d.kind == "zoom":
            assert 76 <= d.side <= 88 and d.prefix in ZOOM_PREFIXES
            assert 0 <= d.top <= d.side - size and 0 <= d.left <= d.side - size
        else:
            assert d.kind == "keep" and d.prefix == "" and 0.6 * size <= d.side <= size
    for kind, p in scale_outcomes(size).items():
        assert sum(d.kind == kind for d in draws) / n == pytest.approx(p, abs=0.03), kind
    assert {d.prefix for d in draws} == {"", *SHRINK_PREFIXES, *ZOOM_PREFIXES}
    # the rescaled outcomes only: no keep, shrink and zoom in their relative proportion
    rescaled = [draw_scale(size, torch.Generator().manual_seed(s), rescaled_only=True) for s in range(600)]
    assert {d.kind for d in rescaled} == {"shrink", "zoom"}
    out = scale_outcomes(size)
    share = sum(d.kind == "shrink" for d in rescaled) / len(rescaled)
    assert share == pytest.approx(out["shrink"] / (out["shrink"] + out["zoom"]), abs=0.06)
    # deterministic under the seed
    again = torch.Generator().manual_seed(0)
    assert [draw_scale(size, again) for _ in range(n)] == draws
    other = torch.Generator().manual_seed(1)
    assert [draw_scale(size, other) for _ in range(50)] != draws[:50]


def test_a_shrunk_photo_sits_on_the_canvas_with_its_eroded_mask_and_a_zoom_is_a_window():
    import torch.nn.functional as F

    from trainers.custom_diffusion import ScaleDraw, apply_scale, valid_mask

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 64, 64, generator=g) * 2 - 1
    mask = (torch.rand(1, 64, 64, generator=g) > 0.3).float()
    small = lambda x, s: F.interpolate(x[None], size=(s, s), mode="bilinear", antialias=True)[0]  # noqa: E731
    shrink = ScaleDraw("shrink", 38, 5, 20, "very small ")
    out, moved = apply_scale(pixels, mask, shrink)
    assert out.shape == pixels.shape and moved is not None and moved.shape == mask.shape
    assert torch.allclose(out[:, 5:43, 20:58], small(pixels, 38), atol=1e-6)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[5:43, 20:58] = True
    assert out[:, ~inside].abs().max() == 0 and moved[:, ~inside].abs().max() == 0  # mid-gray canvas, no mask
    assert torch.allclose(moved[:, 5:43, 20:58], small(mask, 38).clamp(0, 1), atol=1e-6)
    # latent mask (8 px per latent pixel): rows ⌊5/8⌋+1 … ⌊43/8⌋−1, columns ⌊20/8⌋+1 … ⌊58/8⌋−1
    expected = torch.zeros(1, 8, 8)
    expected[:, 1:4, 3:6] = 1
    assert torch.equal(valid_mask(shrink, 64, 8), expected)
    corner = valid_mask(ScaleDraw("shrink", 30, 0, 0, "a far away "), 64, 8)  # rows and columns 1 … ⌊30/8⌋−1
    assert corner.sum() == 1 and corner[0, 1, 1] == 1
    assert valid_mask(ScaleDraw("shrink", 22, 0, 0, "a far away "), 64, 8).sum() == 0  # too small: no loss
    # a zoom is a window of the enlarged photo, the whole of it scored
    zoom = ScaleDraw("zoom", 80, 3, 7, "close up ")
    out, moved = apply_scale(pixels, mask, zoom)
    assert torch.allclose(out, small(pixels, 80)[:, 3:67, 7:71], atol=1e-6) and moved is not None
    assert torch.allclose(moved, small(mask, 80)[:, 3:67, 7:71].clamp(0, 1), atol=1e-6)
    assert torch.equal(valid_mask(zoom, 64, 8), torch.ones(1, 8, 8))
    keep = ScaleDraw("keep", 64, 0, 0, "")
    assert apply_scale(pixels, None, keep) == (pixels, None)


def _photos(folder):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def test_trainer_adds_the_rescaled_photos_with_their_prompts_masks_and_weights(tiny, tmp_path):
    from trainers import get_trainer
    from trainers.custom_diffusion import ScaleAugment, apply_scale, valid_mask

    entry = get_trainer("custom-diffusion")
    common = dict(images=str(_photos(tmp_path / "photos")), class_word="cat", batch_size=6, num_class_images=2,
                  class_steps=1, class_cache_dir=str(tmp_path / "cls"), log_every=0, seed=3, scale_augment=True)

    def make(**kw):
        return entry.make_trainer(tiny, entry.resolve(**(common | kw)), "<new1>")

    trainer = make()
    try:
        scale = trainer.scale
        assert isinstance(scale, ScaleAugment) and scale.weight == pytest.approx((1 - scale.p_keep) / scale.p_keep)
        assert trainer.prior().weight == pytest.approx(1.0 / scale.p_keep)  # λ_prior / p_keep
        assert trainer.trainable()["scale_augment.step"].dtype == torch.int64
        loss = trainer.extra_loss()
        assert loss is not None and loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.embeddings)
        last = scale.last
        assert len(last["draws"]) == 6 and {d.kind for d in last["draws"]} <= {"shrink", "zoom"}
        for draw, prompt in zip(last["draws"], last["prompts"]):
            assert prompt == f"{draw.prefix}photo of a <new1> cat"  # the prefix in front of the instance prompt
        assert last["masks"].shape == (6, 1, 16, 16)  # tiny: 32 px photos, 16 × 16 latents
        pixels, _, _ = scale.batch()  # the same micro-step's draw again: the same photos
        for k, draw in enumerate(last["draws"]):
            assert torch.equal(last["masks"][k], valid_mask(draw, 32, 2))  # photos without masks: the valid area
            moved, _ = apply_scale(pixels[k], None, draw)
            assert moved.shape == (3, 32, 32)
        first = (last["draws"], last["prompts"], last["examples"], last["flips"])
        trainer.after_step()
        scale.loss()
        assert (scale.last["draws"], scale.last["prompts"]) != first[:2]  # a new step draws anew
    finally:
        trainer.teardown()
    # the same seed draws the same rescaled photos, another seed others
    for seed, same in ((3, True), (4, False)):
        again = make(seed=seed)
        try:
            again.extra_loss()
            drawn = (again.scale.last["draws"], again.scale.last["prompts"], again.scale.last["examples"],
                     again.scale.last["flips"])
            assert (drawn == first) is same
        finally:
            again.teardown()
    off = make(scale_augment=False)
    try:
        assert off.scale is None and off.extra_loss() is None and off.prior().weight == 1.0
        assert "scale_augment.step" not in off.trainable()
    finally:
        off.teardown()
    with pytest.raises(StudioError, match="--scale-augment rescales square crops"):
        entry.resolve(**(common | {"buckets": True}))


def test_a_resumed_run_draws_the_same_rescaled_photos(tiny, tmp_path):
    from trainers import get_trainer
    from trainers.loop import run_training

    entry = get_trainer("custom-diffusion")
    photos = _photos(tmp_path / "photos")

    def run(steps, **kw):
        cfg = entry.resolve(images=str(photos), class_word="cat", token="<new1>", steps=steps, batch_size=2,
                            grad_accum=2, lr=1e-2, token_lr=1e-2, prior_preservation=False, log_every=0, seed=0,
                            probe=False, checkpoint_dir=str(tmp_path / "ckpt"), **({"scale_augment": True} | kw))
        trainer = entry.make_trainer(tiny, cfg, "<new1>")
        return run_training(tiny, trainer, cfg, method=entry.method, save=False).concept.tensors

    whole = run(4)
    run(2, checkpoint_every=1, keep_checkpoints=5)
    resumed = run(4, resume="latest")
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    plain = run(4, scale_augment=False)
    assert any(not torch.equal(plain[k], whole[k]) for k in whole)  # the rescaled photos did train
