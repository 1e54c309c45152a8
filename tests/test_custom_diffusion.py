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
