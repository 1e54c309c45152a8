"""Perfusion: the hook against an independent implementation of the equations, key locking,
LoRA interplay, training, the file size, multi-concept prompts and the C⁻¹ cache."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError, IncompatibleConceptError
from studio.methods import get_method, load_concept, save_concept
from studio.methods.attention import ConditioningStore, unet_layers
from studio.methods.perfusion import (
    I_STAR,
    PerfusionHook,
    PerfusionTarget,
    concept_meta,
    concept_tensors,
    gate_beta,
    get_hook,
)
from studio.methods.perfusion.covariance import word_encoding
from tests.conftest import render
from tests.method_cases import make_perfusion, make_ti

CONFIGS = Path(__file__).resolve().parents[1] / "studio" / "models" / "configs"


# -- an independent implementation of the equations -------------------------------------------------
def reference_edit(weight, bias, e, c_inv, stars, targets, betas, taus, exact=False):
    """``W′e + b`` for ``e (B, T, D)``; ``W (out, D)``, ``stars (K, D)``, ``targets o*_k (K, out)``.
    Legend: b batch, t token, d/f feature, k/l concept, o output channel."""
    e, c_inv, stars = e.double(), c_inv.double(), stars.double()
    sim = torch.einsum("btd,df,kf->btk", e, c_inv, stars)
    energy = torch.einsum("kd,df,kf->k", stars, c_inv, stars)
    r = sim / energy
    gate = torch.sigmoid((r - torch.tensor(betas, dtype=r.dtype)) / torch.tensor(taus, dtype=r.dtype))
    if exact:
        gram = torch.einsum("kd,df,lf->kl", stars, c_inv, stars)
        coef = torch.einsum("btl,lk->btk", sim, torch.linalg.inv(gram))
    else:
        coef = r
    e_perp = e - torch.einsum("btk,kd->btd", coef, stars)
    out = torch.einsum("od,btd->bto", weight.double(), e_perp) + torch.einsum("btk,ko->bto", gate, targets.double())
    return out + (bias.double() if bias is not None else 0)


def _random_setup(unet, n_concepts, seed=0, d=None):
    g = torch.Generator().manual_seed(seed)
    layer = unet_layers(unet)[1]
    attn = unet.get_submodule(layer.name)
    d = layer.context_dim
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    c_inv = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    stars = torch.randn(n_concepts, d, generator=g)
    supers = torch.randn(n_concepts, d, generator=g)
    v_out = torch.randn(n_concepts, layer.inner_dim, generator=g)
    betas = [0.5 + 0.1 * k for k in range(n_concepts)]
    taus = [0.1 + 0.05 * k for k in range(n_concepts)]
    n_layers = len(unet_layers(unet))
    targets = [PerfusionTarget(i_star=stars[k], i_super=supers[k],
                               v_targets=[v_out[k] if i == layer.index else torch.zeros(1) for i in range(n_layers)],
                               beta=betas[k], tau=taus[k], c_inv=c_inv) for k in range(n_concepts)]
    return layer, attn, c_inv, stars, supers, v_out, betas, taus, targets


def _hook(targets, exact=False):
    hook = PerfusionHook()
    for k, t in enumerate(targets):
        hook.add(f"c{k}", t, exact=exact)
    return hook


def _edit(hook, layer, attn, e, rows=None):
    key, value = attn.to_k(e), attn.to_v(e)
    rows = rows or slice(0, e.shape[0])
    return hook.edit_kv(ConditioningStore(layers=[]), layer, attn, e, e, key, value, rows)


@pytest.mark.parametrize("n_concepts,exact", [(1, False), (2, False), (3, True)])
def test_hook_matches_the_equation(tiny, n_concepts, exact):
    layer, attn, c_inv, stars, supers, v_out, betas, taus, targets = _random_setup(tiny.pipe.unet, n_concepts)
    e = torch.randn(3, 9, layer.context_dim, generator=torch.Generator().manual_seed(5))
    e[1, 2] = stars[0] * 0.9 + 0.1 * e[1, 2]  # a token near the concept: its gate opens
    with torch.no_grad():
        key, value = _edit(_hook(targets, exact), layer, attn, e)
        w_k, w_v = attn.to_k.weight, attn.to_v.weight
        o_k = supers @ w_k.T  # key locking: o*_K = W_K i*_super
        want_k = reference_edit(w_k, attn.to_k.bias, e, c_inv, stars, o_k, betas, taus, exact)
        want_v = reference_edit(w_v, attn.to_v.bias, e, c_inv, stars, v_out, betas, taus, exact)
    torch.testing.assert_close(key.double(), want_k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(value.double(), want_v, rtol=1e-4, atol=1e-4)


def test_only_conditional_rows_are_edited(tiny):
    layer, attn, *_, targets = _random_setup(tiny.pipe.unet, 2)
    e = torch.randn(4, 5, layer.context_dim)
    with torch.no_grad():
        key, value = _edit(_hook(targets), layer, attn, e, rows=slice(2, 4))
        full_k, full_v = _edit(_hook(targets), layer, attn, e)
        torch.testing.assert_close(key[:2], attn.to_k(e)[:2], rtol=0, atol=0)
        torch.testing.assert_close(value[:2], attn.to_v(e)[:2], rtol=0, atol=0)
        torch.testing.assert_close(key[2:], full_k[2:])
        torch.testing.assert_close(value[2:], full_v[2:])


def test_the_concept_encoding_maps_to_the_gated_target(tiny):
    layer, attn, c_inv, stars, supers, v_out, betas, taus, targets = _random_setup(tiny.pipe.unet, 1)
    e = stars[0].reshape(1, 1, -1)
    with torch.no_grad():
        key, value = _edit(_hook(targets), layer, attn, e)
        gate = torch.sigmoid(torch.tensor((1 - betas[0]) / taus[0]))
        torch.testing.assert_close(key[0, 0], gate * (attn.to_k.weight @ supers[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value[0, 0], gate * v_out[0], rtol=1e-5, atol=1e-5)


def test_locked_keys_get_no_gradient_and_value_targets_do(tiny):
    unet = copy.deepcopy(tiny.pipe.unet)
    layer, attn, c_inv, stars, supers, v_out, betas, taus, targets = _random_setup(unet, 1)
    t = targets[0]
    t.i_super.requires_grad_(True)
    t.v_targets[layer.index].requires_grad_(True)
    attn.to_k.weight.requires_grad_(True)
    e = torch.randn(2, 4, layer.context_dim)
    e[0, 1] = stars[0]
    hook = _hook(targets)
    store = ConditioningStore(layers=[])
    key, value = hook.edit_kv(store, layer, attn, e, e, attn.to_k(e).detach(), attn.to_v(e).detach(), slice(0, 2))
    (key.sum() + value.sum()).backward()
    assert t.i_super.grad is None  # o*_K = W_K i*_super is detached: never trained
    assert t.v_targets[layer.index].grad is not None and t.v_targets[layer.index].grad.abs().sum() > 0
    # the only path into W_K left is the orthogonal term −r·W_K i* (the frozen base weight in training)
    r = (e.double() @ c_inv @ stars[0].double()) / (stars[0].double() @ c_inv @ stars[0].double())
    want = -torch.einsum("bt,d->d", r, stars[0].double())[None].expand(attn.to_k.weight.shape[0], -1)
    torch.testing.assert_close(attn.to_k.weight.grad.double(), want, rtol=1e-4, atol=1e-4)


def test_a_lora_on_to_k_still_acts(tiny):
    from peft import LoraConfig

    unet = copy.deepcopy(tiny.pipe.unet)
    layer, attn, c_inv, stars, supers, v_out, betas, taus, targets = _random_setup(unet, 1)
    e = torch.randn(1, 6, layer.context_dim)
    hook = _hook(targets)
    with torch.no_grad():
        plain_key, _ = _edit(hook, layer, attn, e)
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
        lora_key, lora_value = _edit(hook, layer, attn, e)
        w_eff = attn.to_k.base_layer.weight + attn.to_k.lora_B["default"].weight @ attn.to_k.lora_A["default"].weight
        want = reference_edit(w_eff, None, e, c_inv, stars, supers @ w_eff.T, betas, taus)
    assert (lora_key - plain_key).abs().max() > 1e-3
    torch.testing.assert_close(lora_key.double(), want, rtol=1e-4, atol=1e-4)  # W i* and o*_K include the LoRA


def test_a_projection_bias_stays_outside_the_edit(tiny):
    """SD's to_k/to_v have no bias; with one (plain or under a LoRA wrapper) the edit is still exact."""
    from peft import LoraConfig, inject_adapter_in_model

    unet = copy.deepcopy(tiny.pipe.unet)
    layer, attn, c_inv, stars, supers, v_out, betas, taus, targets = _random_setup(unet, 2)
    g = torch.Generator().manual_seed(9)
    for name in ("to_k", "to_v"):
        old = getattr(attn, name)
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(torch.randn(old.out_features, generator=g))
        setattr(attn, name, new)
    e = torch.randn(2, 5, layer.context_dim, generator=g)
    hook = _hook(targets)
    for wrapped in (False, True):
        if wrapped:
            inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_k", "to_v"], init_lora_weights=False), attn)
        with torch.no_grad():
            key, value = _edit(hook, layer, attn, e)
            w = {}
            for name in ("to_k", "to_v"):
                proj = getattr(attn, name)
                base = proj.base_layer if wrapped else proj
                delta = proj.lora_B["default"].weight @ proj.lora_A["default"].weight * proj.scaling["default"] if wrapped else 0
                w[name] = (base.weight + delta, base.bias)
            want_k = reference_edit(*w["to_k"], e, c_inv, stars, supers @ w["to_k"][0].T, betas, taus)
            want_v = reference_edit(*w["to_v"], e, c_inv, stars, v_out, betas, taus)
        torch.testing.assert_close(key.double(), want_k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(value.double(), want_v, rtol=1e-4, atol=1e-4)


def test_strength_moves_the_gate_monotonically():
    betas = [gate_beta(0.7, 0.15, s) for s in (0.01, 0.25, 0.5, 1.0, 1.5, 2.0)]
    assert betas == sorted(betas, reverse=True) and betas[3] == 0.7
    assert torch.sigmoid(torch.tensor((1 - gate_beta(0.7, 0.15, 0.0)) / 0.15)) < 0.02


def test_sd15_file_size_bound(tmp_path):
    """SD 1.5: 16 layers, Σ out = 12,480, 768-d → ≈ 59 KB (≤ 110 KB, the paper's "100 KB" with o*_K)."""
    from diffusers import UNet2DConditionModel

    sizes = {}
    for family, widths in (("sd1", [768]), ("sdxl", [768, 1280])):
        cfg = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
        layers = unet_layers(unet)
        d = layers[0].context_dim
        tensors = concept_tensors(v_targets=[torch.randn(layer.inner_dim) for layer in layers], i_star=torch.randn(d),
                                  i_super=torch.randn(d), embeddings=[torch.randn(w) for w in widths])
        c = Concept(method="perfusion", tokens=["<x>"], tensors=tensors, class_word="teddy", meta=concept_meta())
        path = save_concept(c, tmp_path / f"{family}.safetensors")
        floats = sum(t.numel() for t in tensors.values())
        sizes[family] = (len(layers), sum(layer.inner_dim for layer in layers), floats, path.stat().st_size)
        assert load_concept(path).tensors.keys() == tensors.keys()
        assert path.stat().st_size <= 4 * floats + 16_384  # data + header, nothing else
    assert sizes["sd1"][:3] == (16, 12_480, 12_480 + 3 * 768)
    assert sizes["sd1"][3] <= 110_000, sizes
    print(sizes)


def test_validation_and_compatibility(tiny_bases):
    tiny = tiny_bases("tiny")
    c = make_perfusion(tiny, "<aa>", 0)
    method = get_method("perfusion")
    broken = Concept(method="perfusion", tokens=["<aa>"], class_word="cat",
                     tensors={k: v for k, v in c.tensors.items() if k != I_STAR})
    with pytest.raises(ConceptFormatError, match="i_star"):
        method.validate(broken)
    with pytest.raises(ConceptFormatError, match="class word"):
        method.validate(Concept(method="perfusion", tokens=["<aa>"], tensors=c.tensors))
    with pytest.raises(IncompatibleConceptError):
        method.check_base(c, tiny_bases("tiny-sdxl"))


def _token_positions(pipe, prompt, tokens):
    ids = pipe.tokenizer(prompt).input_ids
    return [ids.index(pipe.tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def test_two_perfusion_concepts_and_a_ti_concept_in_one_prompt(tiny):
    from studio.generation import applied, effective_strengths
    from studio.methods.runtime import token_table
    from studio.prompts import rewrite

    prompt = "a photo of <aa> and <bb> next to <cc>"
    concepts = [make_perfusion(tiny, "<aa>", 1), make_perfusion(tiny, "<bb>", 2)]
    table = token_table(tiny.pipe)  # i*_k = each token's encoding in this very prompt → r_k = 1 there
    table.set("probe", ["<aa>", "<bb>"], [torch.stack([c.tensors["perfusion.embedding"] for c in concepts])])
    try:
        for c in concepts:
            c.tensors[I_STAR] = word_encoding(tiny.pipe, c.trigger, [prompt.replace(" next to <cc>", "")])
    finally:
        table.drop("probe")
    ti = make_ti(tiny, "<cc>", 3)
    plain = render(tiny, "a photo of cat and cat next to cat")
    resolved = effective_strengths(prompt, "", [(c, None, c.name) for c in [*concepts, ti]])
    with applied(tiny, resolved) as texts:
        hook = get_hook(tiny.pipe.unet)
        hook.record = True
        text = rewrite(prompt, texts)
        image = render(tiny, text)
        gates = hook.gates[0]  # (B, T, K): B = [negative, prompt] (no cfg_layout here: every row is edited)
        pos = _token_positions(tiny.pipe, text, ["<aa>", "<bb>"])
        assert tiny.pipe.tokenizer.convert_tokens_to_ids("<cc>") > 49407  # the TI token is in too
    assert np.abs(image - plain).max() > 1e-3
    open_at_own = torch.sigmoid(torch.tensor((1 - 0.7) / 0.15))
    torch.testing.assert_close(gates[1, pos[0], 0], open_at_own)  # both gates open at their own token
    torch.testing.assert_close(gates[1, pos[1], 1], open_at_own)
    assert gates[1, pos[0], 1] < open_at_own and gates[1, pos[1], 0] < open_at_own
    assert get_hook(tiny.pipe.unet) is None


def test_processors_are_reinstalled_and_only_conditional_rows_edited(tiny):
    from diffusers.models.attention_processor import AttnProcessor

    from studio.generation import applied, effective_strengths
    from studio.methods.attention import cfg_layout

    unet = tiny.pipe.unet
    before = dict(unet.attn_processors)
    c = make_perfusion(tiny, "<aa>", 4)
    resolved = effective_strengths("a photo of <aa>", "", [(c, None, "c")])
    try:
        with applied(tiny, resolved):
            with cfg_layout(unet, guided=True):
                want = render(tiny, "a photo of <aa>")
            unet.set_attn_processor(AttnProcessor())  # something replaced every processor
            with cfg_layout(unet, guided=True):  # … and ours come back (ensure_installed)
                get_hook(unet).record = True
                got = render(tiny, "a photo of <aa>")
                assert get_hook(unet).gates[0].shape[0] == 1  # only the conditional CFG row is edited
    finally:
        unet.set_attn_processor(before)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_global_locking_keys_read_the_superclass_prompt(tiny):
    c = make_perfusion(tiny, "<aa>", 5)
    plain = render(tiny, "a photo of cat on the grass")
    h = get_method("perfusion").apply(tiny, c, strength=1.0, locking="global")
    try:
        contexts = get_hook(tiny.pipe.unet).superclass
        image = render(tiny, "a photo of <aa> on the grass")
        with torch.no_grad():
            emb = tiny.pipe.encode_prompt("a photo of <aa> on the grass", "cpu", 1, False)[0]
            want = tiny.pipe.encode_prompt("a photo of cat on the grass", "cpu", 1, False)[0]
        got = contexts.lookup(emb, slice(0, 1))
        assert got is not None and bool(got[1].all())
        torch.testing.assert_close(got[0], want, rtol=0, atol=0)  # keys see "cat" where the prompt has <aa>
    finally:
        h.remove()
    assert np.abs(image - plain).max() > 1e-3
    np.testing.assert_array_equal(render(tiny, "a photo of cat on the grass"), plain)
    assert get_hook(tiny.pipe.unet) is None and contexts.handles == [] and not tiny.pipe.text_encoder._forward_hooks


def test_inverse_covariance_cache_is_reused_and_keyed_by_identity(tiny, tmp_path, monkeypatch):
    from studio.methods.perfusion import covariance as pc

    settings = pc.CovarianceSettings(n_captions=200)
    calls = []
    real = pc.accumulate_covariance
    monkeypatch.setattr(pc, "accumulate_covariance", lambda *a, **k: calls.append(1) or real(*a, **k))
    fake = SimpleNamespace(pipe=tiny.pipe, identity="builtin:tiny:test-a", extra={})
    first = pc.inverse_covariance(fake, settings, cache_dir=tmp_path)
    assert first.computed and first.path is not None and first.path.is_file() and len(calls) == 1
    assert pc.inverse_covariance(fake, settings, cache_dir=tmp_path) is first  # in memory
    again = pc.inverse_covariance(SimpleNamespace(pipe=tiny.pipe, identity=fake.identity, extra={}), settings,
                                  cache_dir=tmp_path)
    assert not again.computed and again.path == first.path and len(calls) == 1  # read from the file
    torch.testing.assert_close(again.c_inv, first.c_inv, rtol=0, atol=0)
    other = pc.inverse_covariance(SimpleNamespace(pipe=tiny.pipe, identity="builtin:tiny:test-b", extra={}), settings,
                                  cache_dir=tmp_path)
    assert other.computed and other.path != first.path and len(calls) == 2  # another identity, another file
    d = first.c.shape[0]  # C⁻¹ is the ridge-regularised inverse of C
    reg = first.c + settings.ridge * torch.trace(first.c) / d * torch.eye(d, dtype=first.c.dtype)
    torch.testing.assert_close(first.c_inv @ reg, torch.eye(d, dtype=reg.dtype), rtol=0, atol=1e-6)


def test_training_changes_only_the_embedding_and_value_targets(tiny, tmp_path):
    from PIL import Image

    from studio.methods.perfusion import linear_part
    from studio.methods.runtime import token_table
    from studio.methods.textual_inversion import class_embedding
    from trainers.loop import run_training
    from trainers.perfusion import PerfusionConfig, PerfusionTrainer

    rng = np.random.default_rng(0)
    for i in range(2):  # RGBA: the alpha is the subject mask → masked loss
        a = (rng.random((32, 32, 4)) * 255).astype("uint8")
        a[..., 3] = 0
        a[8:24, 8:24, 3] = 255
        Image.fromarray(a, "RGBA").save(tmp_path / f"{i}.png")
    pipe = tiny.pipe
    mods = {"unet": pipe.unet, "te": pipe.text_encoder, "vae": pipe.vae}
    before = {m: {k: v.clone() for k, v in mod.state_dict().items()} for m, mod in mods.items()}
    cfg = PerfusionConfig(images=str(tmp_path), class_word="cat", steps=3, batch_size=2, log_every=0)
    trainer = PerfusionTrainer(tiny, cfg, "<pf>")
    groups = trainer.param_groups()
    # rates in the base's units: the class word's embedding RMS, each layer's o*_V RMS (trainers.rates)
    ids = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    rms = float(pipe.text_encoder.get_input_embeddings().weight[ids].pow(2).mean().sqrt())
    assert groups[0]["lr"] == pytest.approx(cfg.lr_scale * rms) and len(groups) == 1 + 7
    assert [g["lr"] for g in groups[1:]] == pytest.approx([cfg.lr_v_scale * float(g["params"][0].pow(2).mean().sqrt())
                                                          for g in groups[1:]])
    result = run_training(tiny, trainer, cfg, method="perfusion", save=False)
    # measured initialisation: both candidates scored on the probe, the lower loss chosen
    scores = result.concept.train["init_scores"]
    assert set(scores) == {"plain", "cross"} and result.concept.train["init_chosen"] == min(scores, key=scores.get)
    given = PerfusionTrainer(tiny, dataclasses.replace(cfg, lr=0.006, lr_v=0.03), "<pg>")
    assert {g["lr"] for g in given.param_groups()} == {0.006, 0.03}
    given.teardown()
    for m, mod in mods.items():
        for k, v in mod.state_dict().items():
            assert torch.equal(v, before[m][k]), f"{m}.{k} changed"
    assert get_hook(pipe.unet) is None and not token_table(pipe).entries
    t = result.concept.tensors
    class_emb = class_embedding(pipe.tokenizer, pipe.text_encoder.get_input_embeddings(), "cat")
    assert (t["perfusion.embedding"] - class_emb).abs().max() > 1e-4
    layer = unet_layers(pipe.unet)[0]
    with torch.no_grad():
        v0 = linear_part(pipe.unet.get_submodule(layer.name).to_v, t["perfusion.i_super"][None])[0]
    assert (t["perfusion.v_target.0"] - v0).abs().max() > 1e-4
    assert (t[I_STAR] - t["perfusion.i_super"]).abs().max() > 0  # the EMA moved i*
    i_super = word_encoding(pipe, "cat", ["a photo of cat"])
    assert i_super.shape == t["perfusion.i_super"].shape
    get_method("perfusion").validate(result.concept)


def test_perfusion_and_lora_concepts_in_one_prompt(tiny):
    from studio.generation import applied, effective_strengths
    from studio.prompts import rewrite
    from tests.method_cases import make_lora

    pf, lora = make_perfusion(tiny, "<aa>", 6), make_lora(tiny, "<ll>", 7, text_encoder=False)
    prompt = "a photo of <aa> with <ll>"
    plain = render(tiny, "a photo of cat with ll cat", steps=1)
    images = {}
    for name, concepts in (("pf", [pf]), ("lora", [lora]), ("both", [pf, lora])):
        p = prompt if len(concepts) == 2 else (prompt.replace("<ll>", "ll cat") if name == "pf" else
                                               prompt.replace("<aa>", "cat"))
        with applied(tiny, effective_strengths(p, "", [(c, None, c.name) for c in concepts])) as texts:
            images[name] = render(tiny, rewrite(p, texts), steps=1)
    assert np.abs(images["both"] - images["pf"]).max() > 1e-3 and np.abs(images["both"] - images["lora"]).max() > 1e-3
    np.testing.assert_array_equal(render(tiny, "a photo of cat with ll cat", steps=1), plain)  # base again


def test_cli_chooses_global_locking_and_the_exact_orthogonal_term(tiny, tmp_path):
    from PIL import Image

    from studio.cli import main
    from studio.errors import StudioError
    from studio.generation import GenerateConfig

    path = save_concept(make_perfusion(tiny, "<aa>", 5), tmp_path / "aa.safetensors")

    def generate(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        assert main(["generate", "--base", "tiny", "--prompt", "a photo of <aa> on the grass", "--steps", "2",
                     "--concept", str(path), "--out", str(out), *flags]) == 0
        return np.asarray(Image.open(out))

    default = generate("default")
    np.testing.assert_array_equal(generate("local", "--perfusion-locking", "local"), default)  # the concept's own
    assert np.abs(generate("global", "--perfusion-locking", "global").astype(int) - default).max() > 0
    # one concept: the exact orthogonal term equals the approximation
    np.testing.assert_array_equal(generate("exact", "--perfusion-orthogonal", "exact"), default)
    with pytest.raises(StudioError, match="perfusion_locking"):
        GenerateConfig(prompt="a cat", perfusion_locking="everywhere")
