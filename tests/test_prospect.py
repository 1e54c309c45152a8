"""ProSpect: the concept file, per-stage contexts through NeTI's hook (the stage of the current
timestep, stage 0 = the noisiest), per-stage strengths in prompts and ``--concept`` specs, mixing two
concepts stage by stage, removal, and the trainer (only the stage rows of sampled timesteps learn)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.generation import ConceptUse, GenerateConfig, applied, effective_strengths, generate
from studio.methods import get_method, load_concept, save_concept
from studio.methods.attention import AttentionHook, add_hook, remove_hook, store_of
from studio.methods.neti.encoder import text_states
from studio.methods.neti.hook import neti_hook
from studio.methods.prospect import SD_KEY, class_origins, random_concept, stage_of, stage_tables
from studio.methods.runtime import text_encoders, token_table
from studio.prompts import StageStrengths, find_triggers, parse_concept_spec, rewrite
from tests.conftest import render
from tests.method_cases import make_neti, make_ti

STAGES = 10


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("prospect-imgs")
    for i in range(3):
        im = Image.new("RGB", (40, 40), (220, 40 + 40 * i, 40))
        im.paste((30, 30, 200), (10, 10, 30, 30))
        im.save(d / f"{i}.png")
    return d


class ContextProbe(AttentionHook):
    """Records the context each layer's keys are computed from (after the context hooks)."""

    def __init__(self):
        self.calls = []

    def edit_kv(self, store, layer, attn, ctx_k, ctx_v, key, value, rows):
        self.calls.append((layer.index, ctx_k.clone()))
        return key, value


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _contexts_at(base, prompt: str, t: float) -> list[torch.Tensor]:
    """Per cross-attention layer, the keys context (T, D) the UNet reads for ``prompt`` at timestep ``t``
    (SD 1.x: one encoder), through the pipeline's own prompt encoding and one UNet call."""
    pipe = base.pipe
    probe = ContextProbe()
    add_hook(pipe.unet, "probe", probe)
    try:
        with torch.no_grad():
            ehs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            size = pipe.unet.config.sample_size
            latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
            pipe.unet(latents, torch.tensor([t]), encoder_hidden_states=ehs)
    finally:
        remove_hook(pipe.unet, "probe")
    return [ctx[0] for _, ctx in sorted(probe.calls, key=lambda c: c[0])]


def _encode(base, prompt: str, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The context (T, D) of ``prompt`` with each placeholder's input row set to ``vectors[token]``."""
    tok, te = text_encoders(base.pipe)[0]
    ids = _ids(tok, [prompt])
    with torch.no_grad():
        emb = te.get_input_embeddings()(ids)
        for token, v in vectors.items():
            where = ids == tok.convert_tokens_to_ids(token)
            emb = torch.where(where[..., None], v.to(emb.dtype), emb)
        return text_states(te, emb, penultimate=False)[0][0]


def _timestep_of(stage: int) -> float:
    """A raw timestep inside ``stage`` (10 stages of 100 timesteps; stage 0 = 900…999)."""
    return float((STAGES - 1 - stage) * 100 + 37)


# -- stages ------------------------------------------------------------------------------------------
def test_stage_of_puts_the_noisiest_timesteps_in_stage_zero():
    t = torch.tensor([999.0, 900.0, 899.9, 450.0, 100.0, 99.0, 0.0, 1000.0, -1.0])
    assert stage_of(t, 10, 1000).tolist() == [0, 0, 1, 5, 8, 9, 9, 0, 9]
    assert stage_of(torch.arange(1000.0), 10, 1000).bincount().tolist() == [100] * 10
    assert stage_of(torch.tensor([999.0, 0.0]), 1, 1000).tolist() == [0, 0]


# -- the file -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_file_round_trip(tiny_bases, tmp_path, family):
    from safetensors import safe_open

    base = tiny_bases(family)
    c = random_concept(base, "<aa>", 0)
    path = save_concept(c, tmp_path / "c.safetensors")
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
    assert names[0] == "_studio.not_an_embedding"  # ComfyUI would read the first tensor as an embedding
    back = load_concept(path)
    assert back.method == "prospect" and back.meta["prospect.config"] == c.meta["prospect.config"]
    assert set(back.tensors) == set(c.tensors)
    for k in c.tensors:
        assert torch.equal(back.tensors[k], c.tensors[k])
    assert [t.shape for t in stage_tables(back)] == [(STAGES, te.config.hidden_size)
                                                     for _, te in text_encoders(base.pipe)]
    assert get_method("prospect").stage_count(back) == STAGES


def test_validation_refuses_bad_files(tiny):
    method = get_method("prospect")
    c = random_concept(tiny, "<aa>", 0)
    method.validate(c)
    with pytest.raises(ConceptFormatError, match="stages = 10"):
        method.validate(replace(c, tensors={SD_KEY: c.tensors[SD_KEY][:7]}))
    with pytest.raises(ConceptFormatError, match="holds exactly"):
        method.validate(replace(c, tensors={"emb_params": c.tensors[SD_KEY]}))
    with pytest.raises(ConceptFormatError, match="no prospect.config"):
        method.validate(replace(c, meta={}))
    with pytest.raises(ConceptFormatError, match="stages"):
        method.validate(replace(c, meta={"prospect.config": '{"stages": 0, "num_train_timesteps": 1000}'}))
    bad = c.tensors[SD_KEY].clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ConceptFormatError, match="NaN"):
        method.validate(replace(c, tensors={SD_KEY: bad}))


def test_check_base_refuses_another_family(tiny_bases):
    sd1 = random_concept(tiny_bases("tiny"), "<aa>", 0)
    with pytest.raises(IncompatibleConceptError, match="text encoder"):
        get_method("prospect").check_base(sd1, tiny_bases("tiny-sdxl"))


# -- per-stage contexts ---------------------------------------------------------------------------------
def test_each_timestep_reads_its_stage_vector(tiny):
    c = random_concept(tiny, "<aa>", 1)
    table = stage_tables(c)[0]
    handle = get_method("prospect").apply(tiny, c, strength=1.0)
    try:
        prompt = "a photo of <aa> on the grass"
        for stage in (0, 4, 9):
            want = _encode(tiny, prompt, {"<aa>": table[stage]})
            layers = _contexts_at(tiny, prompt, _timestep_of(stage))
            assert len(layers) == len(store_of(tiny.pipe.unet).layers)
            for ctx in layers:  # the same context at every layer: no layer dimension
                torch.testing.assert_close(ctx, want, rtol=0, atol=1e-6)
        hook = neti_hook(tiny.pipe)
        assert hook is not None and hook.n_contexts == 1
    finally:
        handle.remove()


def test_per_stage_strengths_select_the_stages(tiny):
    """``<aa@2-3>``: stages 2–3 read the trained vector, every other stage reads the class word exactly."""
    c = random_concept(tiny, "<aa>", 2)
    table = stage_tables(c)[0]
    prompt = "a photo of <aa@2-3> on the grass"
    resolved = effective_strengths(prompt, "", [(c, None, "a")])
    assert resolved[0].stages == (0, 0, 1, 1, 0, 0, 0, 0, 0, 0)
    with applied(tiny, resolved) as texts:
        text = rewrite(prompt, texts)
        for stage in range(STAGES):
            ctx = _contexts_at(tiny, text, _timestep_of(stage))[0]
            if stage in (2, 3):
                torch.testing.assert_close(ctx, _encode(tiny, text, {"<aa>": table[stage]}), rtol=0, atol=1e-6)
            else:  # strength 0 in this stage: "cat" is one token, so this is the class-word prompt itself
                assert torch.equal(ctx, _encode(tiny, "a photo of cat on the grass", {}))


def test_fractional_stage_strength_interpolates_from_the_class_word(tiny):
    c = random_concept(tiny, "<aa>", 3)
    table = stage_tables(c)[0]
    origin = class_origins(tiny.pipe, "cat", [table.shape[1]])[0]
    handle = get_method("prospect").apply(tiny, c, strength=1.0, stages=(0.5,) * 5 + (1.0,) * 5)
    try:
        prompt = "a photo of <aa>"
        torch.testing.assert_close(_contexts_at(tiny, prompt, _timestep_of(1))[0],
                                   _encode(tiny, prompt, {"<aa>": origin + 0.5 * (table[1] - origin)}), rtol=0, atol=1e-6)
        torch.testing.assert_close(_contexts_at(tiny, prompt, _timestep_of(7))[0],
                                   _encode(tiny, prompt, {"<aa>": table[7]}), rtol=0, atol=1e-6)
    finally:
        handle.remove()


def test_layout_from_one_concept_and_material_from_another(tiny):
    """Two ProSpect concepts with complementary stages in one prompt: early stages read A's vectors
    (B as the class word), late stages B's (A as the class word); the image differs from each alone."""
    a, b = random_concept(tiny, "<aa>", 4), random_concept(tiny, "<bb>", 5)
    ta, tb = stage_tables(a)[0], stage_tables(b)[0]
    origin = class_origins(tiny.pipe, "cat", [ta.shape[1]])[0]
    prompt = "a photo of <aa@0-4> with <bb@5-9>"
    resolved = effective_strengths(prompt, "", [(a, None, "a"), (b, None, "b")])
    assert [r.stages for r in resolved] == [(1,) * 5 + (0,) * 5, (0,) * 5 + (1,) * 5]
    with applied(tiny, resolved) as texts:
        text = rewrite(prompt, texts)
        assert text == "a photo of <aa> with <bb>"
        for stage in (0, 4):
            torch.testing.assert_close(_contexts_at(tiny, text, _timestep_of(stage))[0],
                                       _encode(tiny, text, {"<aa>": ta[stage], "<bb>": origin}), rtol=0, atol=1e-6)
        for stage in (5, 9):
            torch.testing.assert_close(_contexts_at(tiny, text, _timestep_of(stage))[0],
                                       _encode(tiny, text, {"<aa>": origin, "<bb>": tb[stage]}), rtol=0, atol=1e-6)
        mixed = render(tiny, text, steps=4)
    # each concept alone in its own stages (the other one is its class word): both shape the mixed image
    alone_a = _render_with(tiny, [a], "a photo of <aa@0-4> with cat", steps=4)
    alone_b = _render_with(tiny, [b], "a photo of cat with <bb@5-9>", steps=4)
    plain = render(tiny, "a photo of cat with cat", steps=4)
    for other in (alone_a, alone_b, plain):
        assert not np.array_equal(mixed, other)
    assert store_of(tiny.pipe.unet) is None and not token_table(tiny.pipe).entries


def _render_with(base, concepts, prompt, **kw):
    resolved = effective_strengths(prompt, "", [(c, None, c.name) for c in concepts])
    with applied(base, resolved) as texts:
        return render(base, rewrite(prompt, texts), **kw)


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_all_stages_zero_is_the_base_and_remove_restores_it(tiny_bases, family):
    base = tiny_bases(family)
    c = random_concept(base, "<aa>", 6)
    plain = render(base, "a photo of cat on the grass")
    for prompt in ("a photo of <aa:0,0,0,0,0,0,0,0,0,0> on the grass", "a photo of <aa@0-9:0> on the grass"):
        np.testing.assert_array_equal(_render_with(base, [c], prompt), plain)
    # 4 sampler steps visit stages 2, 4, 7 and 9 (timesteps 751 … 1), so stages 0-4 act in two of them
    on = _render_with(base, [c], "a photo of <aa@0-4> on the grass", steps=4)
    assert np.abs(on - render(base, "a photo of cat on the grass", steps=4)).max() > 1e-3
    assert store_of(base.pipe.unet) is None and not token_table(base.pipe).entries
    np.testing.assert_array_equal(render(base, "a photo of cat on the grass"), plain)


def test_prospect_and_neti_share_one_hook(tiny):
    """A NeTI token and a ProSpect token in one prompt: one hook, per-layer contexts, each token right."""
    n, p = make_neti(tiny, "<nn>", 0), random_concept(tiny, "<pp>", 7)
    prompt = "a photo of <nn> and <pp>"
    both = _render_with(tiny, [n, p], prompt)
    assert np.abs(both - _render_with(tiny, [n], "a photo of <nn> and cat")).max() > 1e-3
    assert np.abs(both - _render_with(tiny, [p], "a photo of cat and <pp>")).max() > 1e-3
    resolved = effective_strengths(prompt, "", [(n, None, "n"), (p, None, "p")])
    with applied(tiny, resolved):
        hook = neti_hook(tiny.pipe)
        assert hook is not None and set(hook.entries) == {"<nn>", "<pp>"} and hook.n_contexts == hook.n_layers
        ctx = _contexts_at(tiny, prompt, _timestep_of(3))
        want_pp = stage_tables(p)[0][3]
        mapper = hook.entries["<nn>"].mapper
        for layer in (0, len(ctx) - 1):
            token = mapper.split(mapper(torch.tensor([_timestep_of(3)]), torch.tensor([layer])))[0][0][0]
            tok, te = text_encoders(tiny.pipe)[0]
            ids = _ids(tok, [prompt])
            emb = te.get_input_embeddings()(ids)
            emb = torch.where((ids == tok.convert_tokens_to_ids("<nn>"))[..., None], token, emb)
            emb = torch.where((ids == tok.convert_tokens_to_ids("<pp>"))[..., None], want_pp, emb)
            torch.testing.assert_close(ctx[layer], text_states(te, emb.detach(), penultimate=False)[0][0],
                                       rtol=0, atol=1e-6)
    assert store_of(tiny.pipe.unet) is None and not token_table(tiny.pipe).entries


# -- prompts, specs, errors -----------------------------------------------------------------------------
def test_prompt_syntax_parses_stages_and_keeps_the_old_forms():
    uses = find_triggers("a <hrt> <dog-1:0.8> <aa@0-3> <bb@0,2,5-9:0.5> <cc:1,0.5,0>")
    assert [(u.token, u.strength) for u in uses[:2]] == [("<hrt>", None), ("<dog-1>", 0.8)]
    assert uses[0].stages is None and uses[1].stages is None
    assert uses[2].stages == StageStrengths(on=(0, 1, 2, 3)) and uses[2].strength is None
    assert uses[3].stages == StageStrengths(on=(0, 2, 5, 6, 7, 8, 9)) and uses[3].strength == 0.5
    assert uses[4].stages == StageStrengths(values=(1.0, 0.5, 0.0))
    assert str(uses[3].stages) == "@0,2,5-9" and str(uses[4].stages) == ":1,0.5,0"
    assert rewrite("a <aa@0-3:0.5> b", {"<aa>": "<aa>"}) == "a <aa> b"
    with pytest.raises(StudioError, match="strength must be between"):
        find_triggers("<aa:1,3,0>")
    with pytest.raises(StudioError, match="not both"):
        find_triggers("<aa@0-3:1,0.5>")
    with pytest.raises(StudioError, match="low ≤ high"):
        find_triggers("<aa@5-2>")
    assert parse_concept_spec("dir/c.safetensors:0.8") == ("dir/c.safetensors", 0.8, None)
    assert parse_concept_spec("C:\\x\\c.safetensors") == ("C:\\x\\c.safetensors", None, None)
    assert parse_concept_spec("a.safetensors@5-9:0.8") == ("a.safetensors", 0.8, StageStrengths(on=(5, 6, 7, 8, 9)))
    assert parse_concept_spec("x@y.safetensors:1,0") == ("x@y.safetensors", None, StageStrengths(values=(1.0, 0.0)))
    assert parse_concept_spec("me@home.safetensors") == ("me@home.safetensors", None, None)


def test_stage_errors_are_clear(tiny):
    c = random_concept(tiny, "<aa>", 0)
    with pytest.raises(StudioError, match="3 per-stage strengths for a concept with 10 stages"):
        effective_strengths("<aa:1,0,1>", "", [(c, None, "a")])
    with pytest.raises(StudioError, match="stage 10 does not exist"):
        effective_strengths("<aa@10-12>", "", [(c, None, "a")])
    ti = make_ti(tiny, "<tt>", 0)
    with pytest.raises(StudioError, match="no denoising stages.*<tt:0.8>"):
        effective_strengths("a <tt@0-3>", "", [(ti, None, "t")])
    with pytest.raises(StudioError, match="no denoising stages"):
        effective_strengths("a <tt>", "", [(ti, None, "t", StageStrengths(on=(0,)))])
    assert effective_strengths("a <tt:0.5>", "", [(ti, None, "t")])[0].stages is None  # the old form is untouched


def test_concept_spec_stages_and_prompt_precedence(tiny):
    c = random_concept(tiny, "<aa>", 0)
    spec = StageStrengths(on=(5, 6, 7, 8, 9))
    r = effective_strengths("a <aa>", "", [(c, 0.8, "a", spec)])[0]
    assert r.stages == (0,) * 5 + (0.8,) * 5 and r.strength_text() == "0.8@0,0,0,0,0,0.8,0.8,0.8,0.8,0.8"
    r = effective_strengths("a <aa@0-1>", "", [(c, 0.8, "a", spec)])[0]  # the prompt replaces the spec's stages
    assert r.stages == (0.8, 0.8) + (0,) * 8
    r = effective_strengths("a <aa:0.5>", "", [(c, 0.8, "a", spec)])[0]
    assert r.strength == 0.5 and r.stages is None


def test_generate_with_a_staged_concept_spec_equals_the_prompt_form(tiny):
    c = random_concept(tiny, "<aa>", 8)
    cfg = GenerateConfig(prompt="a photo of <aa>", steps=3, seed=1)
    via_spec = generate(tiny, cfg, [(c, None, "a.safetensors", StageStrengths(on=(0, 1, 2)))])[0]
    via_prompt = generate(tiny, replace(cfg, prompt="a photo of <aa@0-2>"), [(c, None, "a.safetensors")])[0]
    assert np.array_equal(np.asarray(via_spec), np.asarray(via_prompt))
    assert "<aa>:1@1,1,1,0,0,0,0,0,0,0 (aa)" in via_spec.info["parameters"]
    assert ConceptUse("x", None, {"on": [0, 1]}).stages == StageStrengths(on=(0, 1))  # from a request's JSON


def test_cli_generate_takes_stages_on_the_concept_spec(tiny, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = save_concept(random_concept(tiny, "<aa>", 9), tmp_path / "aa.safetensors")
    res = subprocess.run([sys.executable, "-m", "studio", "generate", "--base", "tiny", "--prompt", "a photo of <aa>",
                          "--concept", f"{path}@0-4:0.7", "--steps", "2", "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, cwd=repo, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "<aa>:0.7@0.7,0.7,0.7,0.7,0.7,0,0,0,0,0" in Image.open(tmp_path / "x.png").info["parameters"]


# -- training ----------------------------------------------------------------------------------------
def _trainer(base, images, **kw):
    from trainers import get_trainer

    entry = get_trainer("prospect")
    cfg = entry.resolve(images=str(images), class_word="cat", token="<pp>", log_every=0, probe=False, budget="fixed",
                        **kw)
    return entry, cfg, entry.make_trainer(base, cfg, "<pp>")


def test_a_sample_trains_only_its_stage_row(tiny, images):
    """The gradient of one UNet call at timestep t reaches row g(t) of the table and no other."""
    _, _, trainer = _trainer(tiny, images, steps=1, batch_size=1)
    try:
        pipe = tiny.pipe
        cond = trainer.conditioning(["a photo of <pp>"], 32)
        size = pipe.unet.config.sample_size
        latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        out = pipe.unet(latents, torch.tensor([_timestep_of(6)]), encoder_hidden_states=cond.encoder_hidden_states).sample
        out.square().mean().backward()
        grad = trainer.params[0].grad
        assert grad is not None and grad[6].abs().sum() > 0
        assert torch.equal(grad[[i for i in range(STAGES) if i != 6]], torch.zeros(STAGES - 1, grad.shape[1]))
    finally:
        trainer.teardown()
    assert store_of(tiny.pipe.unet) is None and not token_table(tiny.pipe).entries


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_training_changes_only_the_stage_vectors_and_exports(tiny_bases, images, family):
    from trainers.loop import run_training

    base = tiny_bases(family)
    before = {n: p.detach().clone() for n, p in base.pipe.unet.state_dict().items()}
    entry, cfg, trainer = _trainer(base, images, steps=3, batch_size=2, lr=0.05, stages=4)
    start = [p.detach().clone() for p in trainer.params]
    result = run_training(base, trainer, cfg, method=entry.method, save=False)
    concept = result.concept
    get_method("prospect").validate(concept)
    tables = stage_tables(concept)
    assert [t.shape[0] for t in tables] == [4] * len(text_encoders(base.pipe))
    assert any(not torch.equal(t, s) for t, s in zip(tables, start))
    assert torch.equal(start[0][0], class_origins(base.pipe, "cat", [start[0].shape[1]])[0])  # the class-word start
    for n, p in base.pipe.unet.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert store_of(base.pipe.unet) is None and not token_table(base.pipe).entries
    handle = get_method("prospect").apply(base, concept, strength=1.0)  # the result applies on its base
    handle.remove()


def test_measured_initialisation_scores_both_starts_and_keeps_the_lower(tiny, images):
    """``init auto`` (the default): class and cross are scored by the probe's denoising loss, the lower is
    the start of every stage, and both scores go into the concept's ``studio.train``."""
    from trainers import get_trainer
    from trainers.loop import run_training

    entry = get_trainer("prospect")
    cfg = entry.resolve(images=str(images), class_word="cat", token="<pp>", log_every=0, budget="fixed", steps=1,
                        batch_size=1, lr=0.0, stages=4)
    assert cfg.init == "auto"
    trainer = entry.make_trainer(tiny, cfg, "<pp>")
    result = run_training(tiny, trainer, cfg, method=entry.method, save=False)
    train = result.concept.train
    scores = train["init_scores"]
    assert set(scores) == {"class", "cross"} and scores["class"] != scores["cross"]
    assert train["init_chosen"] == min(scores, key=scores.get)
    start = trainer._initial_vectors(train["init_chosen"])[0]  # lr 0: the table is still its start
    assert torch.equal(stage_tables(result.concept)[0], start[None].expand(4, -1).to(torch.float32))
