"""ClassDiffusion's semantic preservation loss (trainers/classdiffusion.py) inside DreamBooth, on the tiny
SD 1 and SDXL bases: the loss itself, where its gradient goes, the refusal of a frozen text side, and
that it is added to the prior-preservation total rather than replacing it."""

from __future__ import annotations

import pytest
import torch

from studio.errors import TrainingError
from tests.helpers import dreambooth_config, write_square_photos
from trainers import get_trainer
from trainers.classdiffusion import class_counterparts, semantic_preservation_loss, sentence_features
from trainers.data import load_image_folder
from trainers.lora import ADAPTER, PRESETS, make_trainer
from trainers.runner import train
from trainers.templates import fill_templates

ENTRY = get_trainer("dreambooth")
BASES = ["tiny", "tiny-sdxl"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_square_photos(tmp_path_factory.mktemp("cd-imgs"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cd-class-cache")


def _cfg(images, out, cache, **kw):
    return dreambooth_config(images, out, cache, **{"steps": 1, "probe": False, "token": "sks",
                                                    "train_text_encoder": True, "classdiffusion_weight": 1.0, **kw})


def test_class_counterparts_follow_the_training_prompts():
    templates = ["a photo of a {}", "{}", "a photo of {}"]
    captions = [None, None, "sks on the beach"]
    assert fill_templates(templates, captions, "sks", "sks dog") == [
        "a photo of a sks dog", "sks dog", "sks dog on the beach"]
    assert class_counterparts(templates, captions, "sks", "dog") == ["a photo of a dog", "dog", "dog on the beach"]


@pytest.mark.parametrize("name", BASES)
def test_loss_is_zero_for_identical_prompts_and_positive_otherwise(tiny_bases, name):
    base = tiny_bases(name)
    with torch.no_grad():
        same = semantic_preservation_loss(base.pipe, ["a photo of a dog", "a dog"], ["a photo of a dog", "a dog"],
                                          base.device)
        other = semantic_preservation_loss(base.pipe, ["a photo of a sks dog"], ["a photo of a dog"], base.device)
        feats = sentence_features(base.pipe, ["a photo of a dog"], base.device)
    assert same.shape == () and abs(float(same)) < 1e-5
    assert 0 < float(other) <= 2
    # one feature per encoder: SDXL's second is the projected text_embeds the UNet reads
    assert len(feats) == (2 if name == "tiny-sdxl" else 1)
    if name == "tiny-sdxl":
        assert feats[1].shape[-1] == base.pipe.text_encoder_2.config.projection_dim


def test_frozen_text_side_is_refused_in_one_sentence(images, cache_dir, tmp_path):
    with pytest.raises(TrainingError) as err:
        _cfg(images, tmp_path / "x.safetensors", cache_dir, train_text_encoder=False)
    message = str(err.value)
    assert "--train-text-encoder" in message and message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(TrainingError, match="finite number"):
        _cfg(images, tmp_path / "x.safetensors", cache_dir, classdiffusion_weight=-1.0)
    # off, a frozen text side is fine (the UNet-only recipe); on, the full fine-tune of the text encoder is too
    assert _cfg(images, tmp_path / "x.safetensors", cache_dir, train_text_encoder=False,
                classdiffusion_weight=0.0).classdiffusion_weight == 0
    assert _cfg(images, tmp_path / "x", cache_dir, full=True).classdiffusion_weight == 1.0


def test_preset_is_the_demo_world_recipe_with_the_loss_on():
    preset = dict(PRESETS["classdiffusion"])
    assert preset.pop("classdiffusion_weight") > 0
    assert preset == PRESETS["demo-world"]
    assert ENTRY.resolve("classdiffusion", class_word="dog").classdiffusion_weight > 0
    assert ENTRY.resolve(class_word="dog").classdiffusion_weight == 0.0  # off by default


@pytest.mark.parametrize("name,full", [("tiny", False), ("tiny-sdxl", False), ("tiny", True)])
def test_gradient_reaches_the_trainable_text_side_only(tiny_bases, images, cache_dir, tmp_path, name, full):
    base = tiny_bases(name)
    cfg = _cfg(images, tmp_path / ("m" if full else "c.safetensors"), cache_dir, prior_preservation=False, full=full)
    trainer = make_trainer(base, cfg, "sks")
    try:
        examples = load_image_folder(images, base.native_size)
        prompts = trainer.prompts(["a photo of {}"] * 2, examples)
        assert prompts == ["a photo of a sks dog"] * 2
        loss = trainer.extra_loss()
        assert loss is not None and float(loss.detach()) > 0
        loss.backward()
        grads = {k: p.grad for k, p in trainer.trainable().items()}
        text = {k: g for k, g in grads.items() if not k.startswith(("lora_unet", "unet"))}
        unet = {k: g for k, g in grads.items() if k.startswith(("lora_unet", "unet"))}
        assert text and unet
        assert any(g is not None and float(g.abs().sum()) > 0 for g in text.values())
        assert all(g is None or float(g.abs().sum()) == 0 for g in unet.values())
        if name == "tiny-sdxl":  # both encoders receive it
            assert any(g is not None and float(g.abs().sum()) > 0 for k, g in text.items()
                       if k.startswith(("lora_te2", "text_encoder_2")))
        # the loss is of the step's prompts only: once taken, none until the next prompts()
        assert trainer.extra_loss() is None
    finally:
        trainer.teardown()
    assert not any(f".{ADAPTER}." in n for n, _ in base.pipe.unet.named_parameters())


@pytest.mark.parametrize("name", BASES)
def test_loss_adds_to_prior_preservation(tiny_bases, images, cache_dir, tmp_path, name):
    """Step 1's total with λ minus the same run without it is λ · L_SPL of the untrained encoders (the LoRA's
    up matrices start at zero), with prior preservation on in both; and prior preservation still counts."""
    base = tiny_bases(name)
    with torch.no_grad():
        spl = float(semantic_preservation_loss(base.pipe, ["a photo of a sks dog"], ["a photo of a dog"],
                                               base.device))
    runs = {}
    for key, kw in {"both": dict(classdiffusion_weight=2.0), "prior": dict(classdiffusion_weight=0.0),
                    "spl": dict(classdiffusion_weight=2.0, prior_preservation=False)}.items():
        result = train(ENTRY, _cfg(images, tmp_path / f"{key}.safetensors", cache_dir, **kw), base)
        runs[key] = result.losses[0]
        assert result.concept.train["classdiffusion_weight"] == kw["classdiffusion_weight"]
    assert runs["both"] - runs["prior"] == pytest.approx(2.0 * spl, rel=1e-4, abs=1e-6)
    assert abs(runs["both"] - runs["spl"]) > 1e-6  # the class half is in the total too
