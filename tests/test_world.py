"""The learnable world: renderer, concept task, committed base model and oracle (fast checks).

The learning checks (trainers learn the concept) live in ``tests/learning`` under the
``learning`` marker.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from studio.world import (
    CONCEPT,
    DEMO_BASE_DIR,
    ORACLE_PATH,
    VOCABULARY,
    Attributes,
    caption,
    describe,
    editability,
    fidelity,
    load_oracle,
    render,
    sample_attributes,
    upper_bound,
)
from studio.world.oracle import to_tensor

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)




@pytest.fixture(scope="module")
def oracle():
    return load_oracle("cpu")


@pytest.fixture(scope="module")
def world_pipe():
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO_BASE_DIR))
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor())
    return pipe


# ---------------------------------------------------------------------------------------------
# renderer and task
# ---------------------------------------------------------------------------------------------


def test_render_is_deterministic_and_jitter_varies():
    a = Attributes("star", "red", "striped", "pink", "small")
    first, again = np.asarray(render(a, jitter=3)), np.asarray(render(a, jitter=3))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, np.asarray(render(a, jitter=4)))
    # the background is what the attribute says
    assert tuple(first[0, -1]) == (245, 175, 200)


def test_attributes_reject_unknown_values():
    with pytest.raises(ValueError, match="colour"):
        Attributes("circle", "magenta", "plain", "white")


def test_captions_follow_the_grammar():
    assert describe("star", "red", "striped", "pink", "small") == (
        "a photo of a small red striped star on a pink background"
    )
    assert describe(noun="<hrt> circle", background="teal") == "a photo of a <hrt> circle on a teal background"
    rng = random.Random(0)
    a = sample_attributes(rng)
    text = caption(a, rng, p_drop=0.0)
    for name in ("colour", "pattern", "shape", "size", "background"):
        assert getattr(a, name) in text


def test_concept_task_puts_the_concept_in_unseen_contexts(tmp_path):
    photos = CONCEPT.training_images(n=5, seed=0)
    assert len(photos) == 5 and all(p.size == (32, 32) for p in photos)
    assert [np.asarray(p).tobytes() for p in photos] == [
        np.asarray(p).tobytes() for p in CONCEPT.training_images(n=5, seed=0)
    ]
    seen = {"background": set(CONCEPT.train_backgrounds), "size": set(CONCEPT.train_sizes)}
    for attribute, value in CONCEPT.targets():
        assert value not in seen[attribute]
    paths = CONCEPT.write_training_folder(tmp_path / "photos", n=4, seed=1)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png", "03.png"]
    assert all("<hrt> circle" in p for p in CONCEPT.prompts("<hrt> circle"))


# ---------------------------------------------------------------------------------------------
# committed weights
# ---------------------------------------------------------------------------------------------


def test_world_weights_are_committed_small_and_stamped():
    record = json.loads((DEMO_BASE_DIR / "world_build.json").read_text())
    assert len(record["script_sha256"]) == 64 and record["settings"]["seed"] == 0
    total = ORACLE_PATH.stat().st_size + sum(p.stat().st_size for p in DEMO_BASE_DIR.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"world weights take {total / 2**20:.1f} MiB"
    for name in WEIGHT_FILES:
        with safe_open(str(DEMO_BASE_DIR / name), framework="pt") as f:
            stamp = json.loads(f.metadata()["studio.world.build"])
        assert stamp["script_sha256"] == record["script_sha256"]
    with safe_open(str(ORACLE_PATH), framework="pt") as f:
        assert json.loads(f.metadata()["studio.world.build"])["script_sha256"] == record["script_sha256"]


def test_demo_base_is_a_standalone_diffusers_folder(world_pipe):
    assert len(world_pipe.tokenizer) == 49408
    assert world_pipe.tokenizer("a purple dotted circle").input_ids == [49406, 320, 5496, 47950, 7117, 49407]
    assert world_pipe.text_encoder.get_input_embeddings().weight.dtype == torch.float32
    out = world_pipe(["a photo of a red square"], num_inference_steps=4, guidance_scale=4.0,
                     generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)


def test_second_base_is_committed_stamped_and_shares_nothing_of_the_first_shape():
    """world-b: its own build record and stamps; with the world it stays within 30 MiB; another
    resolution, latent size, vocabulary, text width and depth, and UNet layout."""
    from diffusers import StableDiffusionPipeline

    from studio.world import WORLD_B_BASE_DIR, WORLD_B_RESOLUTION

    record = json.loads((WORLD_B_BASE_DIR / "world_build.json").read_text())
    assert record["settings"]["resolution"] == WORLD_B_RESOLUTION and record["settings"]["tokenizer"] == "small"
    for name in WEIGHT_FILES:
        with safe_open(str(WORLD_B_BASE_DIR / name), framework="pt") as f:
            assert json.loads(f.metadata()["studio.world.build"])["script_sha256"] == record["script_sha256"]
    files = [ORACLE_PATH, *DEMO_BASE_DIR.rglob("*"), *WORLD_B_BASE_DIR.rglob("*")]
    total = sum(p.stat().st_size for p in files if p.is_file())
    assert total <= 30 * 2**20, f"the two learnable bases take {total / 2**20:.1f} MiB"
    b = StableDiffusionPipeline.from_pretrained(str(WORLD_B_BASE_DIR))
    a = StableDiffusionPipeline.from_pretrained(str(DEMO_BASE_DIR))
    assert len(b.tokenizer) < 1000 < len(a.tokenizer)
    assert b.text_encoder.config.hidden_size != a.text_encoder.config.hidden_size
    assert b.text_encoder.config.num_hidden_layers != a.text_encoder.config.num_hidden_layers
    assert b.unet.config.block_out_channels != a.unet.config.block_out_channels
    assert b.unet.config.sample_size * b.vae_scale_factor == WORLD_B_RESOLUTION != 32
    assert b.unet.config.sample_size != a.unet.config.sample_size
    assert b.text_encoder.get_input_embeddings().weight.dtype == torch.float32  # fp16 on disk, fp32 loaded
    b.set_progress_bar_config(disable=True)
    out = b(["a photo of a red square"], num_inference_steps=4, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (WORLD_B_RESOLUTION, WORLD_B_RESOLUTION)
    verify = record["metrics"]
    assert verify["base_vocabulary_accuracy"]["mean_attribute"] >= 0.9
    assert min(verify["oracle_accuracy_on_vae_reconstructions"].values()) >= 0.9


def test_oracle_reads_held_out_renders(oracle):
    """> 95 % on every head, on renders with seeds the build never used."""
    rng = random.Random("test-heldout")
    attrs = []
    for i in range(400):
        fixed = CONCEPT.identity if i % 4 == 0 else {}
        attrs.append(sample_attributes(rng, **fixed))
    images = [render(a, jitter=10**6 + i) for i, a in enumerate(attrs)]
    probs = oracle.read(to_tensor(images))
    for name in VOCABULARY:
        acc = float((probs[name].argmax(-1) == torch.tensor([a.index(name) for a in attrs])).float().mean())
        assert acc > 0.95, f"oracle {name} accuracy {acc:.3f}"
    truth = torch.tensor([CONCEPT.is_identity(a) for a in attrs])
    acc = float(((probs["identity"] > 0.5) == truth).float().mean())
    assert acc > 0.95, f"oracle identity accuracy {acc:.3f}"


def test_score_helpers_on_real_renders(oracle):
    ub = upper_bound(per_prompt=2, oracle=oracle)
    assert ub.fidelity > 0.95 and ub.editability > 0.95
    others = [render(Attributes("circle", "purple", "striped", "white")), render(Attributes("square", "purple", "dotted", "white"))]
    assert fidelity(others, oracle) < 0.1
    assert editability(others, [("pattern", "striped"), ("shape", "circle")], oracle) == 0.5


def test_two_attribute_targets_need_every_attribute(oracle):
    """HARD_CONCEPT's compound targets: an image counts as edited only when the oracle reads both attributes,
    and joint success also needs the concept's identity on that same image."""
    from studio.world import HARD_CONCEPT
    from studio.world.score import joint_success

    concept_small_teal = render(CONCEPT.attributes(background="teal", size="small"))
    concept_large_teal = render(CONCEPT.attributes(background="teal", size="large"))
    other_small_teal = render(Attributes("square", "purple", "dotted", "teal", "small"))
    target = [("background+size", "teal+small")] * 3
    images = [concept_small_teal, concept_large_teal, other_small_teal]
    assert editability(images, target, oracle) == pytest.approx(2 / 3)
    assert joint_success(images, target, oracle) == pytest.approx(1 / 3)
    assert all("+" in a for a, _ in HARD_CONCEPT.targets()) and len(HARD_CONCEPT.prompts("<hrt> circle")) == 4
    ub = upper_bound(HARD_CONCEPT, per_prompt=2, oracle=oracle)
    assert ub.fidelity > 0.95 and ub.editability > 0.95
    with pytest.raises(ValueError, match="2 attributes but gives 1"):
        editability([concept_small_teal], [("background+size", "teal")], oracle)


def test_base_model_renders_its_vocabulary(world_pipe, oracle):
    """Fully specified prompts: the oracle reads every prompted attribute on ≥ 80 % of images."""
    from studio.world.score import pipeline_generator

    rng = random.Random("test-vocabulary")
    attrs = [a for a in (sample_attributes(rng) for _ in range(40)) if not CONCEPT.is_identity(a)]
    prompts = [describe(a.shape, a.colour, a.pattern, a.background, a.size) for a in attrs]
    images = pipeline_generator(world_pipe)(prompts, 7)
    probs = oracle.read(images)
    ok = torch.ones(len(attrs), dtype=torch.bool)
    for name in VOCABULARY:
        ok &= probs[name].argmax(-1) == torch.tensor([a.index(name) for a in attrs])
    assert float(ok.float().mean()) >= 0.8, f"all attributes read on {float(ok.float().mean()):.2f} of images"


def test_demo_base_works_as_a_local_folder_base(tmp_path):
    """``--base studio/assets/world/base`` is an ordinary diffusers folder to the studio: same
    family/widths as ``--base demo``, and the CLI renders the same pixels from either."""
    from PIL import Image

    from studio.cli import main
    from studio.models import load_base

    folder, demo = load_base(str(DEMO_BASE_DIR), device="cpu"), load_base("demo", device="cpu")
    assert folder.family == demo.family == "sd1" and folder.native_size == demo.native_size == 32
    outs = []
    for spec in (str(DEMO_BASE_DIR), "demo"):
        out = tmp_path / f"{len(outs)}.png"
        assert main(["generate", "--base", spec, "--prompt", "a photo of a red striped star on a teal background",
                     "--steps", "8", "--guidance", "4", "--out", str(out)]) == 0
        outs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(outs[0], outs[1])
