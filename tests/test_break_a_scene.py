"""Break-A-Scene: the masks' checks, union sampling, the cross-attention loss (its layers and grid), the two
phases, one file per token whose shared LoRA is applied once, composition, refusals, resume, and an end-to-end
run on the demo world with the shape and background masks of a world photo."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from studio.errors import DatasetError, IncompatibleConceptError, StudioError, TrainingError
from studio.methods import get_method, load_concept
from studio.methods.break_a_scene import EMBEDDINGS, META_GROUP, META_TOKENS, groups
from studio.methods.lora import lora_state
from studio.methods.runtime import token_table
from tests.conftest import render
from tests.method_cases import make_ti
from trainers import get_trainer
from trainers.break_a_scene import (
    BreakASceneTrainer,
    attention_layers,
    attention_loss,
    load_scene_masks,
    train_break_a_scene,
)
from trainers.loop import run_training

BAS = get_method("break_a_scene")
ENTRY = get_trainer("break-a-scene")


# -- a scene: photos and per-concept masks ----------------------------------------------------------------------
def _box(size, box):
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


def scene(root, n_images=1, size=32, concepts=("left", "right"), overlap=False):
    """``root/img`` (random photos) and ``root/masks`` (``<stem>.<concept>.png``): the left and right halves
    (overlapping by a quarter with ``overlap``), a third concept the top half."""
    img, masks = root / "img", root / "masks"
    img.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    half = size // 2
    boxes = {"left": (0, 0, half + (size // 4 if overlap else 0), size), "right": (half, 0, size, size),
             "top": (0, 0, size, half)}
    for i in range(n_images):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(img / f"p{i}.png")
        for c in concepts:
            _box(size, boxes[c]).save(masks / f"p{i}.{c}.png")
    return img, masks


def cfg(img, masks, **kw):
    values = dict(images=str(img), masks=str(masks), steps=2, phase1_steps=1, batch_size=2, log_every=0, probe=False,
                  seed=0)
    return ENTRY.resolve(**(values | kw))


def _weights(pipe):
    mods = [pipe.unet, pipe.vae, pipe.text_encoder]
    return [(n, p.detach().clone()) for m in mods for n, p in m.state_dict().items()]


# -- masks: every problem one actionable line ---------------------------------------------------------------------
@pytest.mark.parametrize("problem", ["missing", "size", "empty", "unlisted", "no-image", "not-png", "outside-crop"])
def test_mask_problems_are_one_line_naming_the_file(tmp_path, problem):
    img, masks = scene(tmp_path, n_images=2)
    expect = {"missing": "p1.right.png", "size": "p0.left.png is 16×16", "empty": "p0.left.png is empty",
              "unlisted": "concept 'extra'", "no-image": "names no training image",
              "not-png": "notes.txt", "outside-crop": "outside the square centre crop"}[problem]
    images = sorted(img.glob("*.png"))
    concepts = ""
    if problem == "missing":
        (masks / "p1.right.png").unlink()
    elif problem == "size":
        _box(16, (0, 0, 8, 16)).save(masks / "p0.left.png")
    elif problem == "empty":
        Image.new("L", (32, 32), 0).save(masks / "p0.left.png")
    elif problem == "unlisted":
        _box(32, (0, 0, 4, 4)).save(masks / "p0.extra.png")
        concepts = "left:thing,right:thing"
    elif problem == "no-image":
        _box(32, (0, 0, 4, 4)).save(masks / "q0.left.png")
    elif problem == "not-png":
        (masks / "notes.txt").write_text("x")
    else:  # a wide photo: its centre crop misses a mask on the far left
        wide = img / "p0.png"
        Image.new("RGB", (64, 32), (9, 9, 9)).save(wide)
        _box(32, (0, 0, 1, 1)).resize((64, 32)).save(masks / "p0.left.png")
        Image.new("L", (64, 32), 255).save(masks / "p0.right.png")
    with pytest.raises(DatasetError) as err:
        load_scene_masks(masks, images, 32, concepts=concepts)
    message = str(err.value)
    assert expect in message and "\n" not in message, message


def test_masks_may_overlap_and_names_come_from_the_files_or_the_flag(tmp_path):
    img, masks = scene(tmp_path, n_images=2, overlap=True)
    images = sorted(img.glob("*.png"))
    got = load_scene_masks(masks, images, 32, class_word="thing")
    assert [c.name for c in got.concepts] == ["left", "right"] and [c.token for c in got.concepts] == ["<left>", "<right>"]
    assert {c.class_word for c in got.concepts} == {"thing"}
    assert len(got.masks) == 2 and got.masks[0].shape == (2, 32, 32)
    assert float((got.masks[0][0] * got.masks[0][1]).sum()) > 0  # overlapping masks are fine
    listed = load_scene_masks(masks, images, 32, concepts="right:cat,left")
    assert [(c.name, c.class_word) for c in listed.concepts] == [("right", "cat"), ("left", "left")]
    torch.testing.assert_close(listed.masks[1][0], got.masks[1][1])


@pytest.mark.parametrize(("values", "words"), [
    (dict(concepts="a:b:c"), "name:class-word"), (dict(concepts="a,a"), "twice"), (dict(token="<x>"), "--token"),
    (dict(buckets=True), "--buckets"), (dict(budget="auto"), "--budget fixed"), (dict(eval_every=5), "--eval-every"),
    (dict(phase1_steps=9, steps=4), "phase1_steps"), (dict(gradient_checkpointing=True), "gradient checkpointing"),
    (dict(prompt="a photo"), "{}"), (dict(concepts="a b"), "not valid")])
def test_config_refuses_in_one_line(values, words):
    with pytest.raises(StudioError) as err:
        ENTRY.resolve(**values)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_flags_come_from_the_config():
    import argparse

    from trainers.runner import add_cli_arguments

    parser = argparse.ArgumentParser()
    add_cli_arguments(ENTRY, parser)
    ns = parser.parse_args(["--masks", "m", "--concepts", "dog:dog,mug:cup", "--phase1-steps", "3",
                            "--no-prior-preservation", "--attention-weight", "0.5"])
    assert (ns.masks, ns.concepts, ns.phase1_steps, ns.prior_preservation, ns.attention_weight) == \
        ("m", "dog:dog,mug:cup", 3, False, 0.5)
    from studio.configs import field_specs

    specs = {f.name: f for f in field_specs(type(ENTRY.resolve()))}
    assert "<image-stem>.<concept>.png for every image" in specs["masks"].help and specs["masks"].path == "folder"
    assert "--masks MASKS" in parser.format_help()


# -- the cross-attention layers ---------------------------------------------------------------------------------
def test_attention_layers_follow_the_unet(tiny_bases):
    from diffusers import UNet2DConditionModel

    from studio.methods.attention import unet_layers
    from studio.world import DEMO_BASE_DIR, WORLD_B_BASE_DIR

    demo = UNet2DConditionModel.from_pretrained(str(DEMO_BASE_DIR / "unet"))
    side, layers = attention_layers(demo, 8)  # 8 × 8 latents: latent/4 = 2, the mid block's maps
    assert side == 2 and [unet_layers(demo)[i].name.split(".")[0] for i in layers] == ["mid_block"]
    world_b = UNet2DConditionModel.from_pretrained(str(WORLD_B_BASE_DIR / "unet"))
    side, layers = attention_layers(world_b, 12)  # no 3 × 3 maps: the coarsest level, 6 × 6
    names = [unet_layers(world_b)[i].name for i in layers]
    assert side == 6 and names and all(not n.startswith(("down_blocks.0", "up_blocks.1")) for n in names)
    tiny = tiny_bases("tiny").pipe.unet  # two levels: 16 × 16 latents have no 4 × 4 maps, the coarsest is 8
    assert attention_layers(tiny, 16) == attention_layers(tiny, 16, 8)
    with pytest.raises(TrainingError, match="--attention-side 5"):
        attention_layers(tiny, 16, 5)
    # SD 1.5's layout in miniature: cross-attention at 64, 32, 16 and in the 8 × 8 mid block; 16 = 64/4 is read
    sd15 = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    side, layers = attention_layers(sd15, 64)
    names = [unet_layers(sd15)[i].name.split(".attentions")[0] for i in layers]
    assert side == 16 and names == ["down_blocks.2", "up_blocks.1", "up_blocks.1"], names  # SD 1.5 itself: 2 + 3


def test_attention_loss_matches_its_formula():
    maps = torch.rand(2, 4, 7)
    targets = [torch.rand(2, 2, 2), torch.rand(1, 2, 2)]
    got = attention_loss(maps, [[1, 3], [5]], targets)
    want = 0.0
    for b, (pos, t) in enumerate(zip([[1, 3], [5]], targets)):
        for k, p in enumerate(pos):
            a = maps[b, :, p] / maps[b, :, p].max()
            want += float(((a - t[k].flatten()) ** 2).mean())
    assert abs(float(got) - want / 2) < 1e-6


def test_one_step_reads_only_the_chosen_layers_at_the_masks_grid(tiny, tmp_path):
    img, masks = scene(tmp_path)
    trainer = BreakASceneTrainer(tiny, cfg(img, masks))
    seen: list[tuple[int, tuple[int, ...]]] = []
    probs = trainer.hook.probs

    def spy(store, layer, p, rows):
        seen.append((layer.index, tuple(p.shape)))
        probs(store, layer, p, rows)

    trainer.hook.probs = spy
    try:
        prompts = trainer.prompts(["a photo of {}"] * 2, [None, None])
        latent_mask = trainer.loss_mask(torch.tensor([0, 0]), torch.tensor([0, 1]), (16, 16))
        assert latent_mask.shape == (2, 1, 16, 16)
        for row, m, flip in zip(trainer._rows, latent_mask, (False, True)):  # the union of the drawn concepts
            want = trainer._image_masks(0, flip, 16, 16)[row].amax(dim=0)
            torch.testing.assert_close(m[0], want)
        cond = trainer.conditioning(prompts, 32)
        noisy = torch.randn(2, 4, 16, 16)
        tiny.pipe.unet(noisy, torch.tensor([10, 500]), cond.encoder_hidden_states)
        loss = trainer.extra_loss()
        assert loss is not None and loss.requires_grad
        loss.backward()
        assert trainer.phase1[0].grad is not None and float(trainer.phase1[0].grad.abs().sum()) > 0
    finally:
        trainer.teardown()
    side = trainer.side
    assert sorted({i for i, _ in seen}) == trainer.layers and len(seen) == len(trainer.layers)
    assert all(shape[0] == 2 and shape[2] == side * side for _, shape in seen)
    assert all(t.shape[-2:] == (side, side) for t in trainer._targets)
    # the target is the token's own mask: left is the left half, mirrored on a flipped row
    left = trainer._image_masks(0, False, side, side)[0]
    assert float(left[:, : side // 2].mean()) == 1.0 and float(left[:, side // 2:].mean()) == 0.0
    torch.testing.assert_close(trainer._image_masks(0, True, side, side)[0], left.flip(-1))


def test_union_sampling_covers_every_subset_in_both_orders(tiny, tmp_path):
    img, masks = scene(tmp_path, concepts=("left", "right", "top"))
    trainer = BreakASceneTrainer(tiny, cfg(img, masks, steps=60, phase1_steps=60))
    try:
        for _ in range(60):
            prompts = trainer.prompts(["a photo of {}"] * 4, [None] * 4)
            for p, row in zip(prompts, trainer._rows):
                assert p == "a photo of " + " and ".join(trainer.tokens[k] for k in row)
            trainer.micro = 0
            trainer.state += 1
    finally:
        trainer.teardown()
    rows = trainer.drawn
    assert all(rows) and all(len(set(r)) == len(r) for r in rows)
    subsets = {frozenset(r) for r in rows}
    assert subsets == {frozenset(s) for k in (1, 2, 3) for s in itertools.combinations(range(3), k)}
    sizes = np.bincount([len(r) for r in rows], minlength=4)[1:] / len(rows)
    assert np.all(np.abs(sizes - 1 / 3) < 0.1), sizes  # k ~ U{1..N}, as the paper
    assert {tuple(r) for r in rows if len(r) == 2} >= {(0, 1), (1, 0)}  # random order


# -- the two phases ---------------------------------------------------------------------------------------------------
def test_phase_one_changes_only_the_new_rows(tiny, tmp_path):
    img, masks = scene(tmp_path)
    before = _weights(tiny.pipe)
    table_before = len(tiny.pipe.tokenizer)
    c = cfg(img, masks, steps=3, phase1_steps=3, token_lr=0.05)
    trainer = BreakASceneTrainer(tiny, c)
    start = [p.detach().clone() for p in trainer.phase1]
    lora_start = {k: p.detach().clone() for k, p in trainer.lora.items()}
    seen_phase2_grads = []
    orig_after = trainer.after_step

    def after():
        seen_phase2_grads.append([p.grad for p in trainer.lora.values()])
        orig_after()

    trainer.after_step = after
    result = run_training(tiny, trainer, c, method="break_a_scene", save=False)
    assert all(g is None for gs in seen_phase2_grads for g in gs)  # the LoRA got no gradient in phase 1
    for k, p in trainer.lora.items():
        assert torch.equal(p.detach().cpu(), lora_start[k].cpu()), k
    assert all(float((p.detach() - s).abs().max()) > 1e-4 for p, s in zip(trainer.phase1, start))
    lora = {k: v for k, v in result.concept.tensors.items() if k.endswith("lora_up.weight")}
    assert lora and all(float(v.abs().max()) == 0.0 for v in lora.values())  # B = 0: the LoRA is still the identity
    after_w = _weights(tiny.pipe)
    for (n, p0), (_, p1) in zip(before, after_w):  # nothing of the base moved, and it is handed back clean
        assert torch.equal(p0, p1), n
    assert len(tiny.pipe.tokenizer) == table_before and not getattr(tiny.pipe.unet, "peft_config", None)


def test_phase_two_trains_the_lora_and_goes_on_from_phase_ones_tokens(tiny, tmp_path):
    img, masks = scene(tmp_path)
    c = cfg(img, masks, steps=4, phase1_steps=2, token_lr=0.05, lr=1e-2)
    trainer = BreakASceneTrainer(tiny, c)
    seen = []
    orig = trainer.after_step

    def after():
        seen.append((int(trainer.state[0]) + 1, [p.detach().clone() for p in trainer.phase1],
                     [p.detach().clone() for p in trainer.phase2]))
        orig()

    trainer.after_step = after
    result = run_training(tiny, trainer, c, method="break_a_scene", save=False)
    (_, p1_at2, _), (_, p1_at3, p2_at3) = seen[1], seen[2]
    assert torch.equal(p1_at2[0], p1_at3[0])  # phase 1's tensor froze at the switch
    assert not torch.equal(p2_at3[0], p1_at3[0])  # phase 2's went on from it (copied, then trained)
    ups = [v for k, v in result.concept.tensors.items() if k.endswith("lora_up.weight")]
    assert any(float(v.abs().max()) > 0 for v in ups)
    emb = result.concept.tensors[EMBEDDINGS[0]]
    torch.testing.assert_close(emb, trainer.phase2[0].detach().cpu()[:1])


# -- files: one per token, the LoRA applied once ----------------------------------------------------------------------
@pytest.fixture
def run_files(tiny, tmp_path):
    img, masks = scene(tmp_path)
    res = train_break_a_scene(tiny, img, masks, out=tmp_path / "out" / "kitchen.safetensors", steps=3, phase1_steps=1,
                              batch_size=2, lr=0.05, token_lr=0.05, log_every=0, class_word="thing")
    return res


def test_one_file_per_token_each_complete(run_files, tiny):
    paths = run_files.paths
    assert [p.name for p in paths] == ["kitchen-left.safetensors", "kitchen-right.safetensors"]
    files = [load_concept(p) for p in paths]
    assert [f.tokens for f in files] == [["<left>"], ["<right>"]] and files[0].name == "kitchen-left"
    assert all(f.class_word == "thing" and f.method == "break_a_scene" for f in files)
    lora = [{k: v for k, v in f.tensors.items() if k.startswith("lora_")} for f in files]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])
    assert files[0].meta[META_GROUP] == files[1].meta[META_GROUP]
    assert json.loads(files[0].meta[META_TOKENS]) == ["<left>", "<right>"]
    assert not torch.equal(files[0].tensors[EMBEDDINGS[0]], files[1].tensors[EMBEDDINGS[0]])
    assert files[0].train["concepts"][1] == {"name": "right", "token": "<right>", "class_word": "thing"}
    assert "verdict" not in files[0].metrics or files[0].metrics == files[1].metrics
    with pytest.raises(StudioError, match="does not match"):  # an edited LoRA no longer claims the group
        edited = files[0]
        key = next(k for k in edited.tensors if k.endswith("lora_up.weight"))
        edited.tensors[key] = edited.tensors[key] + 1
        BAS.validate(edited)


def _render(base, concepts, prompt):
    from studio.generation import applied, effective_strengths
    from studio.prompts import rewrite

    resolved = effective_strengths(prompt, "", [(c, None, c.name) for c in concepts])
    with applied(base, resolved) as texts:
        adapters = dict(lora_state(base.pipe).weights)
        return render(base, rewrite(prompt, texts)), adapters


def test_two_files_of_one_run_apply_the_lora_once_and_removing_restores_exactly(run_files, tiny):
    left, right = (load_concept(p) for p in run_files.paths)
    before, tok = _weights(tiny.pipe), len(tiny.pipe.tokenizer)
    plain = render(tiny, "a photo of thing and thing")
    both, adapters = _render(tiny, [left, right], "a photo of <left> and <right>")
    assert len(adapters) == 1 and list(adapters.values()) == [1.0]  # one adapter for the run's two files
    alone, _ = _render(tiny, [left], "a photo of <left> and thing")
    assert np.abs(both - plain).max() > 1e-4 and np.abs(both - alone).max() > 1e-4
    # by hand: the second file only adds its token; the LoRA leaves with the last one
    h1 = BAS.apply(tiny, left, strength=1.0)
    h2 = BAS.apply(tiny, right, strength=0.5)
    group = groups(tiny.pipe)[h1.group]
    assert h1.group == h2.group and group.members == {"<left>": 1.0, "<right>": 0.5} and group.weight == 1.0
    h1.remove()
    assert lora_state(tiny.pipe).weights == {group.adapter: 0.5}  # the strongest file left sets the weight
    h2.remove()
    assert not groups(tiny.pipe) and getattr(tiny.pipe, "_studio_lora", None) is None
    np.testing.assert_array_equal(render(tiny, "a photo of thing and thing"), plain)
    for (n, p0), (_, p1) in zip(before, _weights(tiny.pipe)):
        assert torch.equal(p0, p1), n
    assert len(tiny.pipe.tokenizer) == tok and not getattr(tiny.pipe.unet, "peft_config", None)


def test_composes_with_a_textual_inversion_concept(run_files, tiny):
    left, right = (load_concept(p) for p in run_files.paths)
    ti = make_ti(tiny, "<ti>", 3)
    prompt = "a photo of <left> and <right> with <ti>"
    plain = render(tiny, "a photo of thing and thing with cat")
    without_ti, _ = _render(tiny, [left, right], "a photo of <left> and <right> with cat")
    mixed, adapters = _render(tiny, [left, ti, right], prompt)
    assert len(adapters) == 1 and np.abs(mixed - without_ti).max() > 1e-4
    assert not token_table(tiny.pipe).entries
    np.testing.assert_array_equal(render(tiny, "a photo of thing and thing with cat"), plain)


def test_sdxl_trains_a_token_in_both_encoders_and_applies(tiny_bases, tmp_path):
    base = tiny_bases("tiny-sdxl")
    img, masks = scene(tmp_path)
    res = train_break_a_scene(base, img, masks, out=tmp_path / "xl.safetensors", steps=2, phase1_steps=1,
                              batch_size=2, log_every=0, probe=False)
    files = [load_concept(p) for p in res.paths]
    assert all(set(EMBEDDINGS) <= set(f.tensors) for f in files)
    plain = render(base, "a photo of left and right")
    out, adapters = _render(base, files, "a photo of <left> and <right>")
    assert len(adapters) == 1 and np.abs(out - plain).max() > 0
    np.testing.assert_array_equal(render(base, "a photo of left and right"), plain)


def test_sd3_and_flux_are_refused_in_one_sentence(tiny_bases, tmp_path):
    from studio.models.families import FAMILY_LABELS

    img, masks = scene(tmp_path)
    for name in ("tiny-sd3", "tiny-flux"):
        base = tiny_bases(name)
        for call in (lambda b=base: BAS.check_base(None, b), lambda b=base: BreakASceneTrainer(b, cfg(img, masks))):
            with pytest.raises(IncompatibleConceptError) as err:
                call()
            message = str(err.value)
            assert "\n" not in message and FAMILY_LABELS[base.family] in message and "cross-attention" in message


# -- prior preservation off (the reference's crash) and on; resume --------------------------------------------------------
@pytest.mark.parametrize("prior", [False, True])
def test_trains_with_and_without_prior_preservation(tiny, tmp_path, prior):
    img, masks = scene(tmp_path)
    c = cfg(img, masks, steps=2, phase1_steps=1, prior_preservation=prior, num_class_images=2, class_steps=1,
            class_cache_dir=str(tmp_path / "cc"), batch_size=1)
    trainer = BreakASceneTrainer(tiny, c)
    assert (trainer.prior() is not None) == prior
    rows = []
    orig = trainer.extra_loss

    def extra():
        rows.append(len(trainer._rows))
        return orig()

    trainer.extra_loss = extra
    result = run_training(tiny, trainer, c, method="break_a_scene", save=False)
    assert rows == [1, 1] and all(np.isfinite(result.losses)) and trainer.values["attention"] > 0
    if prior:
        assert trainer.prior().prompts[0] == "a photo of left and right"


def test_a_resumed_run_is_the_uninterrupted_run(tiny, tmp_path):
    img, masks = scene(tmp_path, n_images=2, concepts=("left", "right", "top"))

    def run(steps, **kw):
        c = cfg(img, masks, steps=steps, phase1_steps=2, token_lr=0.05, lr=1e-2, checkpoint_dir=str(tmp_path / "ck"),
                **kw)
        trainer = BreakASceneTrainer(tiny, c)
        run_training(tiny, trainer, c, method="break_a_scene", save=False)
        return {k: v.tensors for k, v in zip(("a", "b", "c"), trainer.exported)}

    whole = run(4)
    run(3, checkpoint_every=1, keep_checkpoints=5)  # stops after the switch to phase 2
    resumed = run(4, resume="latest")
    for name in whole:
        assert resumed[name].keys() == whole[name].keys()
        for key in whole[name]:
            torch.testing.assert_close(resumed[name][key], whole[name][key], rtol=0, atol=0)


def test_cli_trains_into_the_library(tiny, tmp_path, monkeypatch):
    from studio.cli import main
    from studio.library import Library
    from studio.models import BaseSettings

    img, masks = scene(tmp_path)
    monkeypatch.setattr(BaseSettings, "load", lambda self: tiny)
    code = main(["train", "break-a-scene", "--base", "tiny", "--images", str(img), "--masks", str(masks),
                 "--concepts", "left:thing,right:thing", "--name", "room", "--steps", "2", "--batch-size", "1",
                 "--no-probe", "--library", str(tmp_path / "lib")])
    assert code == 0
    names = sorted(info.name for info in Library(tmp_path / "lib").list())
    assert names == ["room-left", "room-right"]


# -- the demo world: a photo's shape and its background, end to end ---------------------------------------------------
def test_the_demo_world_trains_a_shape_and_its_background_end_to_end(tmp_path):
    from studio.models import load_base
    from studio.world import CONCEPT
    from studio.world import render as world_render
    from studio.world.render import render_mask

    base = load_base("demo", device="cpu")
    img, masks = tmp_path / "img", tmp_path / "masks"
    img.mkdir()
    masks.mkdir()
    attributes = CONCEPT.attributes(background="white")
    jitter = random.Random("scene").randrange(2**31)
    world_render(attributes, jitter=jitter).save(img / "photo.png")
    shape = render_mask(attributes, jitter=jitter)
    shape.save(masks / "photo.shape.png")
    ImageOps.invert(shape).save(masks / "photo.background.png")
    res = train_break_a_scene(base, img, masks, concepts=f"shape:{CONCEPT.class_word},background:background",
                              steps=6, phase1_steps=3, log_every=0, out=tmp_path / "out" / "scene.safetensors")
    assert [p.name for p in res.paths] == ["scene-shape.safetensors", "scene-background.safetensors"]
    assert res.concepts[0].train["attention_side"] == 2 and res.concepts[0].metrics["verdict"]["gain"] > 0
    shape_c, background_c = (load_concept(p) for p in res.paths)
    plain = render(base, "a photo of circle on a white background", steps=4, guidance_scale=4.0)
    out, adapters = _render(base, [shape_c, background_c], "a photo of <shape> on <background>")
    assert len(adapters) == 1 and np.isfinite(out).all() and np.abs(out - plain).max() > 1e-3
    assert not groups(base.pipe) and not token_table(base.pipe).entries
