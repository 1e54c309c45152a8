"""NeTI: the mapper, the encoder pass, per-layer/per-timestep contexts through the shared
processor, training (only the mapper changes; gradient checkpointing), the concept file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import ConceptFormatError, IncompatibleConceptError
from studio.methods import get_method, load_concept, save_concept
from studio.methods.attention import AttentionHook, add_hook, cfg_layout, remove_hook, store_of
from studio.methods.neti import (
    NetiMapper,
    mapper_config_for,
    mapper_from_concept,
    neti_hook,
    random_concept,
    truncation_for,
    with_bypass,
)
from studio.methods.neti.encoder import bypass_direction, text_states
from studio.methods.runtime import text_encoders, token_table
from tests.conftest import render
from tests.method_cases import make_lora, make_perfusion, make_ti


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("neti-imgs")
    for i in range(3):
        im = Image.new("RGB", (40, 40), (220, 40 + 40 * i, 40))
        im.paste((30, 30, 200), (10, 10, 30, 30))
        im.save(d / f"{i}.png")
    return d


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _expected(pipe, mapper, trigger, prompt, t, layer):
    """Keys and values contexts (T, ΣD) of ``prompt`` at (t, ℓ), computed alone (no batching)."""
    keys, values = [], []
    out = mapper(torch.tensor([float(t)]), torch.tensor([layer]))
    penultimate = len(text_encoders(pipe)) > 1
    for (tok, te), (token, byp) in zip(text_encoders(pipe), mapper.split(out)):
        ids = _ids(tok, [prompt])
        where = ids == tok.convert_tokens_to_ids(trigger)
        emb = torch.where(where[..., None], token[:, None], te.get_input_embeddings()(ids))
        direction = bypass_direction(byp, mapper.cfg.bypass_scale)[:, None].expand_as(emb)
        k, v = text_states(te, emb, penultimate=penultimate, bypass=direction, where=where)
        keys.append(k[0])
        values.append(v[0])
    return torch.cat(keys, -1), torch.cat(values, -1)


class KVProbe(AttentionHook):
    """Records the contexts each layer's keys and values are computed from."""

    def __init__(self):
        self.calls = []

    def edit_kv(self, store, layer, attn, ctx_k, ctx_v, key, value, rows):
        self.calls.append((layer.index, float(store.timestep.flatten()[0]), ctx_k.clone(), ctx_v.clone(), rows))
        return key, value


# -- the mapper ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_mapper_output_shapes_and_norms(tiny_bases, family):
    base = tiny_bases(family)
    cfg = mapper_config_for(base.pipe, "cat")
    widths = [te.config.hidden_size for _, te in text_encoders(base.pipe)]
    assert list(cfg.widths) == widths and cfg.n_layers == len(store_layers(base))
    mapper = NetiMapper(cfg, generator=torch.Generator().manual_seed(0))
    t, layer = torch.tensor([0.0, 250.0, 999.0]), torch.tensor([0, 3, cfg.n_layers - 1])
    out = mapper(t, layer)
    assert out.shape == (3, 2 * sum(widths)) and out.dtype == torch.float32
    start = 0
    for (token, byp), w, norm in zip(mapper.split(out), widths, cfg.class_norms):
        assert token.shape == byp.shape == (3, w)
        chunk = out[:, start:start + 2 * w]
        torch.testing.assert_close(chunk.norm(dim=-1), torch.full((3,), norm))  # [token; bypass] at the class norm
        start += 2 * w
    # truncation zeroes h[k:] before the output layer; nested dropout only with a generator
    h = mapper.hidden(t, layer)
    manual = mapper.output_layer(h * (torch.arange(cfg.hidden) < 5))
    torch.testing.assert_close(mapper.split(mapper(t, layer, truncation=5))[0][0],
                               mapper.split(torch.nn.functional.normalize(manual[:, :2 * widths[0]], dim=-1)
                                            * cfg.class_norms[0])[0][0])
    assert torch.equal(mapper(t, layer), out)
    dropped = [mapper(t, layer, dropout=torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(d, out) for d in dropped)


def store_layers(base):
    from studio.methods.attention import unet_layers

    return unet_layers(base.pipe.unet)


def test_anchors_initialise_the_first_layer(tiny):
    cfg = mapper_config_for(tiny.pipe, "cat")
    mapper = NetiMapper(cfg, generator=torch.Generator().manual_seed(1))
    n_layers = len(store_layers(tiny))
    assert mapper.input_layer.weight.shape == (10 * n_layers, 2048) and mapper.w.shape == (1024, 2)
    t, layer = mapper.anchors()
    assert t.tolist() == [float(x) for x in range(0, 1000, 100) for _ in range(n_layers)]
    assert layer.tolist() == [float(x) for _ in range(10) for x in range(n_layers)]
    torch.testing.assert_close(mapper.input_layer.weight, mapper.encode(t, layer))
    # each anchor's encoding is most similar to itself: the first layer starts as an anchor lookup
    sims = mapper.encode(t, layer) @ mapper.input_layer.weight.T
    assert torch.equal(sims.argmax(dim=1), torch.arange(len(t)))
    # σ_t = 0.03 on time, σ_ℓ = 2 on layers
    assert 0.02 < float(mapper.w[:, 0].std()) < 0.04 and 1.7 < float(mapper.w[:, 1].std()) < 2.3


def test_fourier_buffer_survives_save_and_load(tiny, tmp_path):
    c = random_concept(tiny, "<aa>", 5)
    assert "neti.w" in c.tensors and "neti.config" in c.meta
    path = save_concept(c, tmp_path / "c.safetensors")
    loaded = load_concept(path)
    a, b = mapper_from_concept(c), mapper_from_concept(loaded)
    t, layer = torch.tensor([3.0, 500.0]), torch.tensor([1, 6])
    assert torch.equal(a(t, layer), b(t, layer))
    assert torch.equal(b.w, c.tensors["neti.w"])
    other = random_concept(tiny, "<aa>", 6)  # another draw of w gives other outputs: the buffer matters
    assert not torch.equal(mapper_from_concept(other).w, b.w)
    size = sum(v.numel() * v.element_size() for v in c.tensors.values())
    assert path.stat().st_size < size + 10_000


def test_file_validation_and_wrong_base(tiny_bases):
    tiny, sdxl = tiny_bases("tiny"), tiny_bases("tiny-sdxl")
    c = random_concept(tiny, "<aa>", 0)
    method = get_method("neti")
    bad = dict(c.tensors)
    bad.pop("neti.w")
    from dataclasses import replace

    with pytest.raises(ConceptFormatError, match="neti.w"):
        method.validate(replace(c, tensors=bad))
    with pytest.raises(ConceptFormatError, match="neti.config"):
        method.validate(replace(c, meta={}))
    with pytest.raises(IncompatibleConceptError, match="width"):
        method.check_base(c, sdxl)


# -- the encoder pass --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-v", "tiny-sdxl"])
def test_encoder_pass_equals_the_text_encoder(tiny_bases, family):
    base = tiny_bases(family)
    penultimate = family == "tiny-sdxl"
    for tok, te in text_encoders(base.pipe):
        ids = _ids(tok, ["a photo of a cat", "a dog on the grass, oil painting"])
        k, v = text_states(te, te.get_input_embeddings()(ids), penultimate=penultimate)
        with torch.no_grad():
            ref = te(ids, output_hidden_states=True).hidden_states[-2] if penultimate else te(ids)[0]
        assert k is v
        assert torch.equal(k, ref)


def test_bypass_moves_only_the_concept_position(tiny_bases):
    te = tiny_bases("tiny-sdxl").pipe.text_encoder
    tok = tiny_bases("tiny-sdxl").pipe.tokenizer
    ids = _ids(tok, ["a photo of a cat"])
    emb = te.get_input_embeddings()(ids)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[0, 4] = True
    b = torch.randn(1, 77, emb.shape[-1])
    k, v = text_states(te, emb, penultimate=True, bypass=bypass_direction(b, 0.2), where=where)
    diff = (v - k)[0]
    assert torch.equal(diff[torch.arange(77) != 4], torch.zeros(76, emb.shape[-1]))
    expected = 0.2 * b[0, 4] / b[0, 4].norm() * k[0, 4].norm()
    torch.testing.assert_close(diff[4], expected)


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_batched_encoder_pass_equals_per_layer_passes(tiny_bases, family):
    base = tiny_bases(family)
    c = random_concept(base, "<aa>", 2)
    applied = get_method("neti").apply(base, c, strength=1.0)
    try:
        hook = neti_hook(base.pipe)
        mapper = hook.entries["<aa>"].mapper
        prompts = ["a photo of <aa>", "<aa> on a beach, watercolor"]
        t = torch.tensor([980.0, 35.0])
        for e, (tok, _) in enumerate(text_encoders(base.pipe)):
            keys, values = hook.layer_contexts(e, _ids(tok, prompts), t)
            lo = sum(w for w in hook.widths[:e])
            assert keys.shape == (hook.n_layers, 2, 77, hook.widths[e])
            for layer in range(hook.n_layers):
                for q, prompt in enumerate(prompts):
                    k, v = _expected(base.pipe, mapper, "<aa>", prompt, t[q], layer)
                    torch.testing.assert_close(keys[layer, q], k[:, lo:lo + hook.widths[e]])
                    torch.testing.assert_close(values[layer, q], v[:, lo:lo + hook.widths[e]])
    finally:
        applied.remove()


# -- inference through the shared processor ---------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_contexts_reach_each_layer_at_each_timestep(tiny_bases, family):
    base = tiny_bases(family)
    pipe = base.pipe
    c = random_concept(base, "<aa>", 3)
    applied = get_method("neti").apply(base, c, strength=1.0)
    probe = KVProbe()
    try:
        store = add_hook(pipe.unet, "probe", probe)
        n_layers = len(store.layers)
        with cfg_layout(pipe.unet, guided=True):
            render(base, "a photo of <aa> on the grass", steps=2)
        hook = neti_hook(pipe)
        mapper = hook.entries["<aa>"].mapper
        assert [call[0] for call in probe.calls] == list(range(n_layers)) * 2
        times = [call[1] for call in probe.calls]
        assert times[0] > times[n_layers]  # two timesteps, in sampling order
        uncond = probe.calls[0][2][0]
        for layer, t, ctx_k, ctx_v, rows in probe.calls:
            assert rows == slice(1, 2) and ctx_k.shape[0] == 2
            k, v = _expected(pipe, mapper, "<aa>", "a photo of <aa> on the grass", t, layer)
            torch.testing.assert_close(ctx_k[1], k)  # the conditional row: this layer's, this timestep's
            torch.testing.assert_close(ctx_v[1], v)
            assert not torch.equal(ctx_k[1], ctx_v[1])  # values carry the bypass
            assert torch.equal(ctx_k[0], uncond) and torch.equal(ctx_v[0], uncond)  # unconditional row untouched
        first = [call[2][1] for call in probe.calls[:n_layers]]
        assert not torch.equal(first[0], first[-1])  # layers differ
        assert not torch.equal(probe.calls[0][2][1], probe.calls[n_layers][2][1])  # timesteps differ
        # a second image of the same prompt re-uses the per-timestep contexts
        passes = hook.stats.encoder_passes
        render(base, "a photo of <aa> on the grass", steps=2, seed=1)
        assert hook.stats.encoder_passes == passes and hook.stats.cache_hits >= 2 * len(hook.widths)
    finally:
        remove_hook(pipe.unet, "probe")
        applied.remove()
    assert store_of(pipe.unet) is None


def test_strength_is_truncation_and_bypass_can_be_switched_off(tiny):
    assert truncation_for(1.0, 128) is None and truncation_for(1.5, 128) is None
    ks = [truncation_for(s, 128) for s in (0.01, 0.25, 0.5, 0.75, 0.99)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[2] == 11
    c = random_concept(tiny, "<aa>", 4)
    method = get_method("neti")
    images = {}
    for s in (0.25, 0.5, 1.0):
        h = method.apply(tiny, c, strength=s)
        try:
            entry = neti_hook(tiny.pipe).entries["<aa>"]
            assert entry.truncation == truncation_for(s, 128) and entry.bypass
            images[s] = render(tiny, "a photo of <aa> on the grass")
        finally:
            h.remove()
    assert np.abs(images[0.25] - images[1.0]).max() > 1e-4 and np.abs(images[0.5] - images[1.0]).max() > 1e-4
    for concept, kw in ((with_bypass(c, False), {}), (c, {"bypass": False})):
        h = method.apply(tiny, concept, strength=1.0, **kw)
        try:
            hook = neti_hook(tiny.pipe)
            assert not hook.entries["<aa>"].bypass
            keys, values = hook.layer_contexts(0, _ids(tiny.pipe.tokenizer, ["a photo of <aa>"]), torch.tensor([10.0]))
            assert values is keys
            no_bypass = render(tiny, "a photo of <aa> on the grass")
        finally:
            h.remove()
        assert np.abs(no_bypass - images[1.0]).max() > 1e-4


def test_composes_with_textual_inversion_lora_and_perfusion(tiny):
    from studio.generation import applied, effective_strengths
    from studio.prompts import rewrite

    pipe = tiny.pipe
    before = [v.clone() for m in (pipe.unet, pipe.text_encoder) for v in m.state_dict().values()]
    plain = render(tiny, "a photo of cat and cat with sks cat by cat")
    concepts = [make_ti(tiny, "<ti>", 1), make_lora(tiny, "<lo>", 2), make_perfusion(tiny, "<pf>", 4),
                random_concept(tiny, "<nt>", 3)]
    prompt = "a photo of <nt> and <ti> with <lo> by <pf>"

    def run(strength_neti):
        p = prompt.replace("<nt>", f"<nt:{strength_neti}>")
        resolved = effective_strengths(p, "", [(c, None, c.name) for c in concepts])
        with applied(tiny, resolved) as texts:
            return render(tiny, rewrite(p, texts))

    mixed, neti_off = run(1), run(0)
    assert np.abs(mixed - neti_off).max() > 1e-4  # NeTI acts next to TI, LoRA and Perfusion
    assert np.abs(neti_off - plain).max() > 1e-4  # … which act too
    np.testing.assert_array_equal(render(tiny, "a photo of cat and cat with sks cat by cat"), plain)
    after = [v for m in (pipe.unet, pipe.text_encoder) for v in m.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert store_of(pipe.unet) is None and not token_table(pipe).entries


# -- training ---------------------------------------------------------------------------------------
def _cfg(images, out, **kw):
    from trainers import get_trainer

    values = dict(images=str(images), out=str(out), class_word="cat", steps=2, batch_size=2, grad_accum=1,
                  log_every=0, seed=0)
    values.update(kw)
    return get_trainer("neti").resolve(**values)


def _state(pipe):
    mods = {"unet": pipe.unet, "vae": pipe.vae} | {f"te{i}": te for i, (_, te) in enumerate(text_encoders(pipe))}
    return {f"{m}.{k}": v.clone() for m, mod in mods.items() for k, v in mod.state_dict().items()}


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_only_the_mapper_trains(tiny_bases, images, tmp_path, family):
    from trainers import get_trainer
    from trainers.runner import train

    base = tiny_bases(family)
    before = _state(base.pipe)
    tok_len = len(base.pipe.tokenizer)
    cfg = _cfg(images, tmp_path / "c.safetensors", lr=5e-2)
    start = NetiMapper(mapper_config_for(base.pipe, "cat"), generator=torch.Generator().manual_seed(cfg.seed))
    res = train(get_trainer("neti"), cfg, base)
    after = _state(base.pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(base.pipe.tokenizer) == tok_len and store_of(base.pipe.unet) is None
    trained = load_concept(res.path)
    assert trained.method == "neti" and trained.class_word == "cat"
    for name, value in start.state_dict().items():
        same = torch.equal(trained.tensors[f"neti.{name}"], value)
        assert same == (name == "w"), name  # every weight moved; the Fourier buffer did not


def test_gradient_checkpointing_gives_the_same_mapper_gradients(tiny):
    from trainers.neti import NetiTrainConfig, NetiTrainer

    trainer = NetiTrainer(tiny, NetiTrainConfig(class_word="cat", nested_dropout=0.0), "<gc>")
    unet = tiny.pipe.unet
    calls = []
    context = trainer.hook.context
    trainer.hook.context = lambda *a: calls.append(a[1].index) or context(*a)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])

    def grads():
        trainer.mapper.zero_grad(set_to_none=True)
        cond = trainer.conditioning(["a photo of <gc>", "<gc> on a table"], 32)
        unet(x, t, cond.encoder_hidden_states).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in trainer.mapper.named_parameters()}

    try:
        plain = grads()
        n_plain = len(calls)
        unet.enable_gradient_checkpointing()
        try:
            ckpt = grads()
        finally:
            unet.disable_gradient_checkpointing()
    finally:
        trainer.teardown()
    assert len(calls) - n_plain > n_plain  # the blocks were recomputed, re-reading their contexts
    assert all(float(g.abs().sum()) > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    assert store_of(unet) is None


def test_resume_is_bit_identical(tiny, images, tmp_path):
    from trainers import get_trainer
    from trainers.runner import train

    entry = get_trainer("neti")
    straight = train(entry, _cfg(images, tmp_path / "a.safetensors", steps=4), tiny).concept
    train(entry, _cfg(images, tmp_path / "b.safetensors", steps=2, checkpoint_every=1, keep_checkpoints=5), tiny)
    resumed = train(entry, _cfg(images, tmp_path / "b.safetensors", steps=4, resume="latest"), tiny).concept
    for k in straight.tensors:
        assert torch.equal(straight.tensors[k], resumed.tensors[k]), k


def test_cli_trains_a_concept(images, tmp_path):
    from studio.cli import main

    out = tmp_path / "cli.safetensors"
    rc = main(["train", "neti", "--base", "tiny", "--device", "cpu", "--images", str(images), "--class-word", "cat",
               "--out", str(out), "--preset", "cpu", "--steps", "2", "--library", str(tmp_path / "lib")])
    assert rc == 0
    c = load_concept(out)
    assert c.method == "neti" and c.train["steps"] == 2 and c.train["batch_size"] == 1
