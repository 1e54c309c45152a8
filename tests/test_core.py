"""CoRe (trainers/core.py): the context losses, their gradients, the prompt sets, the layers read, the
norm-rescaling window, and training with ``--core`` on the tiny bases (textual inversion and NeTI)."""

from __future__ import annotations

import pytest
import torch

from studio.errors import TrainingError
from studio.methods.attention import store_of, unet_layers
from tests.helpers import write_photos
from trainers import get_trainer
from trainers.core import (
    AttentionCapture,
    ContextPair,
    NormWindow,
    capturing,
    context_attention_loss,
    context_embedding_loss,
    context_prompts,
    layer_levels,
    make_pairs,
    resolve_layers,
)
from trainers.core_prompts import GENERIC_PROMPTS, world_prompts
from trainers.loop import run_training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("core-photos")
    write_photos(folder)
    return folder


def _ti(base, images, **kw):
    entry = get_trainer("textual-inversion")
    values = dict(images=str(images), class_word="cat", token="<tok>", steps=2, batch_size=2, lr=5e-2, log_every=0,
                  seed=0, probe=False, core=True, core_prompts="generic", init="cross")
    cfg = entry.resolve(**(values | kw))
    return entry, cfg, entry.make_trainer(base, cfg, "<tok>")


def _training_call(trainer, base, batch=2, seed=0):
    """One UNet call as the loop makes it (gradients on), which CoRe records and reuses."""
    g = torch.Generator().manual_seed(seed)
    unet = base.pipe.unet
    size = unet.config.sample_size
    cond = trainer.conditioning([trainer.preview_prompt("a photo of {}")] * batch, base.native_size)
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    unet(sample, torch.tensor([900, 300][:batch]), cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs)


def test_losses_are_zero_when_the_concept_reads_like_its_class():
    aligned = [ContextPair("a {} x", "", "", (0, 1), (3, 4), (3, 4)), ContextPair("a {} y z", "", "", (0, 1), (3, 4, 5), (3, 4, 5))]
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 8, 6, generator=g)
    assert float(context_embedding_loss([states], [states], aligned)) == pytest.approx(0.0, abs=1e-6)
    mu = torch.rand(2, 8, generator=g)
    assert float(context_attention_loss(mu, mu, aligned)) == 0.0
    assert float(context_attention_loss(mu, mu.flip(-1), aligned)) > 0
    pairs = [aligned[0], ContextPair("a {} y z", "", "", (0, 1), (3, 4, 5), (4, 5, 6))]
    # row 1's class tokens sit one later: the losses compare position 3 with 4, not 3 with 3
    shifted = states.clone()
    shifted[1, 4:7] = states[1, 3:6]
    shifted[1, 3] = torch.randn(6, generator=g)
    assert float(context_embedding_loss([states], [shifted], pairs)) == pytest.approx(0.0, abs=1e-6)
    assert float(context_embedding_loss([states], [states.flip(-1)], pairs)) > 0.1


def test_end_to_end_zero_when_the_vector_is_the_class_words_embedding(tiny, images):
    """Plain initialisation from the class word's (single-token) embedding: the concept prompt reads
    exactly like the class prompt, so both losses vanish."""
    _, _, trainer = _ti(tiny, images, init="plain", num_vectors=1)
    try:
        _training_call(trainer, tiny)
        loss = trainer.core.loss()
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
        assert trainer.core.values["embedding"] == pytest.approx(0.0, abs=1e-6)
        assert trainer.core.values["attention"] == pytest.approx(0.0, abs=1e-10)
    finally:
        trainer.teardown()


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_gradient_reaches_the_token_vectors_only(tiny_bases, images, name):
    base = tiny_bases(name)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(base.pipe, part, None) is not None:
            getattr(base.pipe, part).zero_grad(set_to_none=True)  # the session's shared base: another test may have left gradients
    _, _, trainer = _ti(base, images, core_embedding_weight=1.0, core_attention_weight=1.0)
    try:
        _training_call(trainer, base)
        loss = trainer.core.loss()
        loss.backward()
        assert set(trainer.core.values) == {"embedding", "attention"}
        assert all(v > 0 for v in trainer.core.values.values())
        for p in trainer.params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0
        pipe = base.pipe
        modules = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if name == "tiny-sdxl" else [])
        trained = {id(p) for p in trainer.params}
        for module in modules:
            assert all(p.grad is None for p in module.parameters() if id(p) not in trained)
    finally:
        trainer.teardown()


def test_tokens_before_the_concept_carry_no_gradient(tiny, images):
    _, _, trainer = _ti(tiny, images)
    try:
        pair = trainer.core.pairs[0]
        states = trainer._core_states([pair.concept], None, torch.tensor([500]))[0]  # (1, T, D)
        p = trainer.params[0]
        (before,) = torch.autograd.grad(states[0, list(pair.before)].sum(), p, allow_unused=True, retain_graph=True)
        assert before is None or torch.count_nonzero(before) == 0
        (after,) = torch.autograd.grad(states[0, list(pair.concept_after)].sum(), p)
        assert torch.count_nonzero(after) > 0
        with torch.no_grad():  # and their outputs are the class prompt's
            klass = trainer._core_states([pair.klass], None, torch.tensor([500]))[0]
            assert torch.allclose(states[0, list(pair.before)], klass[0, list(pair.before)], atol=1e-6)
    finally:
        trainer.teardown()


def test_pairs_locate_the_context_around_multi_token_concepts(tiny):
    pairs = make_pairs(tiny.pipe, ["a photo of a {} on the beach"], "<tok> <tok>#1", "tabby cat")
    tok = tiny.pipe.tokenizer
    pair = pairs[0]
    concept_ids, class_ids = tok(pair.concept).input_ids, tok(pair.klass).input_ids
    assert pair.before == tuple(range(5))  # SOT a photo of a
    assert [concept_ids[i] for i in pair.concept_after] == [class_ids[i] for i in pair.class_after]
    assert tok.decode([class_ids[i] for i in pair.class_after[:-1]]).strip() == "on the beach"
    assert pair.concept_after[-1] == len(concept_ids) - 1  # end-of-text included


@pytest.mark.parametrize("bad, says", [("a photo of {}", "no words after"), ("a photo of a dog", "exactly one"),
                                       ("{} and {}", "exactly one")])
def test_refuses_prompts_without_context_after_the_concept(tiny, images, tmp_path, bad, says):
    path = tmp_path / "prompts.txt"
    path.write_text(f"a photo of a {{}} in the snow\n{bad}\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=says):
        _ti(tiny, images, core_prompts_file=str(path))
    assert store_of(tiny.pipe.unet) is None and not tiny.pipe.unet._forward_pre_hooks
    assert len(tiny.pipe.tokenizer) == 49408  # the trainer put the pipeline back


def test_config_refuses_bad_settings(images):
    entry = get_trainer("textual-inversion")
    for bad, says in [(dict(core_layers="low,2"), "core_layers"), (dict(core_every=0), "core_every"),
                      (dict(core_attention_weight=-1.0), "core_attention_weight"),
                      (dict(core_rescale_start=0.7, core_rescale_end=0.5), "fractions")]:
        with pytest.raises(TrainingError, match=says):
            entry.resolve(images=str(images), class_word="cat", core=True, **bad)
    with pytest.raises(TrainingError, match="class"):
        entry.resolve(images=str(images), init="names", names_file="x.txt", core=True)


def test_prompt_sets_follow_the_base(tiny, tmp_path):
    from studio.world import WORLD_B_BASE_DIR

    assert context_prompts(tiny) == ("generic", list(GENERIC_PROMPTS))  # a CLIP vocabulary reads English
    world_like = type("Base", (), {"profile": type("P", (), {"kind": "world"})(), "pipe": tiny.pipe})()
    assert context_prompts(world_like)[0] == "world"
    from transformers import CLIPTokenizer

    learnt = CLIPTokenizer.from_pretrained(str(WORLD_B_BASE_DIR), subfolder="tokenizer")  # 665 world words
    pipe = type("Pipe", (), {"tokenizer": learnt, "text_encoder": tiny.pipe.text_encoder})()
    assert context_prompts(type("Base", (), {"pipe": pipe})())[0] == "world"
    assert all(p.count("{}") == 1 for p in world_prompts())
    path = tmp_path / "p.txt"
    path.write_text("\n a {} on a hill \n\n", encoding="utf-8")
    assert context_prompts(tiny, "auto", str(path)) == (str(path), ["a {} on a hill"])


def test_every_shipped_prompt_has_context_after_the_concept(tiny):
    for templates in (GENERIC_PROMPTS, world_prompts()):
        pairs = make_pairs(tiny.pipe, templates, "<a> <a>#1", "dog")
        assert all(len(p.concept_after) >= 2 for p in pairs)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_layer_levels_match_the_resolution_each_layer_sees(tiny_bases, name):
    base = tiny_bases(name)
    unet = base.pipe.unet
    levels = layer_levels(unet)
    capture = AttentionCapture(range(len(levels)))
    seen = {}

    def spy(store, layer, probs, rows):
        seen[layer.index] = probs.shape[2]

    capture.probs = spy  # type: ignore[method-assign]
    size = unet.config.sample_size
    cond = torch.zeros(1, 77, unet.config.cross_attention_dim)
    added = None
    if unet.config.addition_embed_type == "text_time":
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(1, width), "time_ids": torch.zeros(1, 6)}
    with capturing(unet, capture), torch.no_grad():
        capture.active = True
        unet(torch.zeros(1, 4, size, size), torch.tensor([10]), cond, added_cond_kwargs=added)
    assert store_of(unet) is None
    assert [seen[i] for i in range(len(levels))] == [(size // 2 ** lv) ** 2 for lv in levels]
    low = resolve_layers(unet, "low")
    assert low and all(levels[i] == max(levels) for i in low)
    assert resolve_layers(unet, "all") == list(range(len(unet_layers(unet))))
    with pytest.raises(TrainingError, match="do not exist"):
        resolve_layers(unet, "0,99")


def test_norm_window_holds_the_norms_inside_it_only():
    p = torch.nn.Parameter(torch.randn(2, 4))
    window = NormWindow([p], start=2, end=4)
    grow = lambda: p.data.mul_(torch.tensor([[1.5], [0.5]]))  # noqa: E731
    grow()
    window.after_step(1)
    grow()
    window.after_step(2)  # the reference
    ref = p.detach().norm(dim=-1).clone()
    for step in (3, 4):
        grow()
        window.after_step(step)
        torch.testing.assert_close(p.detach().norm(dim=-1), ref)
    grow()
    window.after_step(5)
    assert not torch.allclose(p.detach().norm(dim=-1), ref)
    assert NormWindow([p], 3, 3).trainable() == {}


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_textual_inversion_trains_with_core_and_restores_the_pipeline(tiny_bases, images, name):
    base = tiny_bases(name)
    unet = base.pipe.unet
    hooks_before = len(unet._forward_pre_hooks)
    processors = dict(unet.attn_processors)
    entry, cfg, trainer = _ti(base, images, steps=3, core_every=2)
    try:
        result = run_training(base, trainer, cfg, method=entry.method, save=False)
        assert int(trainer.core.state[0]) == 3 and set(trainer.core.values) == {"embedding", "attention"}
        assert all(torch.isfinite(torch.tensor(result.losses)))
        assert result.concept.train["core"] is True and result.concept.train["core_prompt_set"] == "generic"
    finally:
        trainer.teardown()
    assert len(unet._forward_pre_hooks) == hooks_before and store_of(unet) is None
    assert all(unet.attn_processors[k] is v for k, v in processors.items())


def test_core_off_changes_nothing(tiny, images):
    hooks_before = len(tiny.pipe.unet._forward_pre_hooks)
    _, _, trainer = _ti(tiny, images, core=False)
    try:
        assert trainer.core is None and set(trainer.trainable()) == {"emb_params"}
        assert len(tiny.pipe.unet._forward_pre_hooks) == hooks_before
    finally:
        trainer.teardown()


def test_resumed_run_equals_an_uninterrupted_one(tiny, images, tmp_path):
    entry = get_trainer("textual-inversion")

    def run(steps, **kw):
        cfg = entry.resolve(images=str(images), class_word="cat", token="<tok>", steps=steps, batch_size=2, lr=5e-2,
                            log_every=0, seed=0, probe=False, core=True, init="cross", core_rescale_start=0.25,
                            core_rescale_end=0.75, checkpoint_dir=str(tmp_path / "ckpt"), **kw)
        trainer = entry.make_trainer(tiny, cfg, "<tok>")
        try:
            return run_training(tiny, trainer, cfg, method=entry.method, save=False).concept.tensors["emb_params"]
        finally:
            trainer.teardown()

    whole = run(4)
    run(2, checkpoint_every=1, keep_checkpoints=5)
    resumed = run(4, resume="latest")
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_neti_trains_with_core(tiny_bases, images, name):
    base = tiny_bases(name)
    entry = get_trainer("neti")
    cfg = entry.resolve(images=str(images), class_word="cat", token="<tok>", steps=2, batch_size=2, grad_accum=1,
                        log_every=0, seed=0, probe=False, core=True, core_prompts="generic", core_layers="low",
                        core_embedding_weight=1.0, core_attention_weight=1.0)
    trainer = entry.make_trainer(base, cfg, "<tok>")
    try:
        assert trainer.core.layers == resolve_layers(base.pipe.unet, "low")
        # the embedding loss reads every layer's context: (L, B, T, D_e) per encoder, with gradients to the mapper
        states = trainer._core_states([trainer.core.pairs[0].concept] * 2, None, torch.tensor([900, 100]))
        assert states[0].shape[:2] == (len(unet_layers(base.pipe.unet)), 2) and states[0].requires_grad
        result = run_training(base, trainer, cfg, method=entry.method, save=False)  # tears the trainer down
        assert set(trainer.core.values) == {"embedding", "attention"} and all(v > 0 for v in trainer.core.values.values())
        assert result.concept.train["core_layers_read"] == trainer.core.layers
    finally:
        trainer.teardown()
    assert store_of(base.pipe.unet) is None
