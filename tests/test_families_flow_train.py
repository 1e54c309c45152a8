"""Training on the flow families (SD 3 / FLUX): the flow-matching objective, DreamBooth-LoRA and textual
inversion on ``tiny-sd3`` / ``tiny-flux``, and that their files load in plain diffusers with the same pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from studio.errors import IncompatibleConceptError, TrainingError
from studio.generation import applied, effective_strengths
from studio.methods import get_method, load_concept
from studio.methods.lora.files import export_diffusers
from studio.methods.lora.flow_keys import flow_module_path
from studio.models import build_tiny_pipeline, load_base
from studio.prompts import rewrite
from tests.helpers import write_square_photos
from trainers import get_trainer
from trainers.flow import image_ids, loss_weights, pack_latents, sigmas_from_draw, unpack_latents
from trainers.runner import train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_square_photos(tmp_path_factory.mktemp("flow-imgs"))


@pytest.fixture(scope="module")
def flow_bases():
    return {name: load_base(name, device="cpu") for name in ("tiny-sd3", "tiny-flux")}


def _render(pipe, prompt):
    return pipe(prompt=prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def _studio_render(base, concept, prompt):
    with applied(base, effective_strengths(prompt, "", [(concept, None, "c")])) as texts:
        text = rewrite(prompt, texts)
        return text, _render(base.pipe, text)


# -- the objective ---------------------------------------------------------------------------------
def test_packing_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(image_ids(6, 8, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, torch.device("cpu"), torch.float32))


def test_sigma_densities_and_weights():
    draws = torch.arange(1000)
    logit = sigmas_from_draw(draws, 1000)
    assert abs(float(logit.median()) - 0.5) < 1e-2 and float(logit.min()) > 0 and float(logit.max()) < 1
    # logit-normal: logit(σ) ~ N(0, 1) — its quantiles are Φ⁻¹'s
    z = torch.logit(logit.double())
    assert abs(float(z.std()) - 1) < 0.02 and abs(float(z.mean())) < 1e-6
    assert float(sigmas_from_draw(draws, 1000, logit_mean=1.0).mean()) > 0.6  # m > 0: more noise
    uniform = sigmas_from_draw(draws, 1000, density="uniform")
    assert torch.allclose(uniform, (draws + 0.5) / 1000)
    shifted = sigmas_from_draw(draws, 1000, density="uniform", shift=3.0)
    assert torch.allclose(shifted, 3 * uniform / (1 + 2 * uniform))
    mode = sigmas_from_draw(draws, 1000, density="mode")
    assert float(mode.min()) > 0 and float(mode.max()) < 1
    s = torch.tensor([0.25, 0.5])
    assert torch.allclose(loss_weights(s, "precondition"), s ** 2)
    assert torch.allclose(loss_weights(s, "sigma_sqrt"), s ** -2)
    assert torch.allclose(loss_weights(s, "cosmap"), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))


def test_flow_names_unflatten():
    assert flow_module_path("single_transformer_blocks_0_attn_to_q") == "single_transformer_blocks.0.attn.to_q"
    assert flow_module_path("transformer_blocks_1_attn_to_add_out") == "transformer_blocks.1.attn.to_add_out"
    assert flow_module_path("transformer_blocks_0_ff_context_net_0_proj") == "transformer_blocks.0.ff_context.net.0.proj"
    assert flow_module_path("transformer_blocks_0_attn_add_q_proj") == "transformer_blocks.0.attn.add_q_proj"


def test_flow_refusals(flow_bases, images, tmp_path):
    entry = get_trainer("dreambooth")
    cfg = entry.resolve(images=str(images), out=str(tmp_path / "x.safetensors"), class_word="dog", steps=1,
                        lr=1e-3, snr_gamma=5.0, prior_preservation=False, train_text_encoder=False)
    with pytest.raises(TrainingError, match="flow objective"):
        train(entry, cfg, flow_bases["tiny-flux"])
    full = entry.resolve(images=str(images), out=str(tmp_path / "f"), class_word="dog", steps=1, lr=1e-3, full=True,
                         prior_preservation=False)
    with pytest.raises(TrainingError, match="not supported yet"):
        train(entry, full, flow_bases["tiny-sd3"])
    ti = get_trainer("textual-inversion")
    with pytest.raises(IncompatibleConceptError, match="cross-attention"):
        train(ti, ti.resolve(images=str(images), out=str(tmp_path / "t.safetensors"), class_word="dog", steps=1,
                             core=True), flow_bases["tiny-sd3"])
    # the attention methods keep their one-sentence refusal
    for name in ("perfusion", "neti", "prospect", "custom_diffusion"):
        with pytest.raises(IncompatibleConceptError, match="cross-attention"):
            get_method(name).check_base(None, flow_bases["tiny-sd3"])


# -- DreamBooth-LoRA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_lora_trains_and_loads_in_diffusers_with_the_same_pixels(flow_bases, images, tmp_path, name):
    base = flow_bases[name]
    entry = get_trainer("dreambooth")
    cfg = entry.resolve(images=str(images), out=str(tmp_path / "dog.safetensors"), class_word="dog", steps=2, lr=3e-2,
                        log_every=0, seed=0, num_class_images=2, class_steps=1, class_batch_size=2,
                        class_cache_dir=str(tmp_path / "cc"), train_text_encoder=True)
    before = {k: v.clone() for k, v in base.pipe.transformer.state_dict().items()}
    result = train(entry, cfg, base)
    assert all(math.isfinite(x) for x in result.losses)
    after = base.pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is handed back untouched
    names = {k.split(".")[0] for k in result.concept.tensors}
    assert any(n.startswith("lora_transformer_transformer_blocks_0_attn_add_q_proj") for n in names)
    assert any(n.startswith("lora_te1_") for n in names)
    assert not any("text_encoder_3" in n or "lora_te3_" in n for n in names)  # never T5
    if name == "tiny-flux":
        assert "lora_transformer_single_transformer_blocks_0_attn_to_q" in names
        assert "lora_transformer_transformer_blocks_0_ff_context_net_2" in names
        assert not any("lora_te2_" in n for n in names)
    else:
        assert any(n.startswith("lora_te2_") for n in names)
    concept = load_concept(result.path)
    text, studio = _studio_render(base, concept, "a photo of <sks> on the grass")
    assert text == "a photo of sks dog on the grass"
    plain = build_tiny_pipeline(name)
    assert np.abs(_render(plain, text) - studio).max() > 1e-3  # the LoRA changes the image
    plain.load_lora_weights(str(export_diffusers(concept, tmp_path / "peft.safetensors")))
    np.testing.assert_array_equal(_render(plain, text), studio)
    # a FLUX LoRA does not fit SD 3, nor an SD 3 LoRA FLUX
    other = flow_bases["tiny-sd3" if name == "tiny-flux" else "tiny-flux"]
    with pytest.raises(IncompatibleConceptError):
        get_method("lora").check_base(concept, other)


# -- textual inversion -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_textual_inversion_loads_in_diffusers_with_the_same_pixels(flow_bases, images, tmp_path, name):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders import TextualInversionLoaderMixin

    base = flow_bases[name]
    entry = get_trainer("textual-inversion")
    cfg = entry.resolve(images=str(images), out=str(tmp_path / "ti.safetensors"), class_word="dog", steps=2, lr=5e-2,
                        log_every=0, seed=0, batch_size=2)
    result = train(entry, cfg, base)
    stored = load_file(str(result.path))
    assert set(stored) == ({"clip_l", "clip_g"} if name == "tiny-sd3" else {"clip_l"})
    concept = load_concept(result.path)
    text, studio = _studio_render(base, concept, f"a photo of {concept.trigger} on the grass")
    tokens = text.split()[3:3 + stored["clip_l"].shape[0]]
    plain = build_tiny_pipeline(name)
    if name == "tiny-sd3":  # diffusers' SD 3 pipeline has no loader mixin; its loader works on the same parts

        class SD3WithTI(StableDiffusion3Pipeline, TextualInversionLoaderMixin):
            pass

        plain = SD3WithTI(**plain.components)
    plain.load_textual_inversion(stored["clip_l"], token=tokens, text_encoder=plain.text_encoder,
                                 tokenizer=plain.tokenizer)
    if "clip_g" in stored:
        plain.load_textual_inversion(stored["clip_g"], token=tokens, text_encoder=plain.text_encoder_2,
                                     tokenizer=plain.tokenizer_2)
    np.testing.assert_array_equal(_render(plain, text), studio)


# -- aspect-ratio buckets ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_buckets_train_on_the_flow_families(flow_bases, tmp_path, name):
    """Non-square photos in buckets whose latent sides are whole patches (FLUX: its 2×2 packing)."""
    from PIL import Image

    from trainers.buckets import scale_factors

    base = flow_bases[name]
    vae, patch = scale_factors(base.pipe)
    assert vae == base.pipe.vae_scale_factor and patch == 2  # both tiny transformers: patch 2 / packed 2×2
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48)]):
        im = Image.new("RGB", (w, h), (200, 60 + 40 * i, 40))
        im.paste((20, 20, 220), (4, 4, w // 2, h // 2))
        im.save(folder / f"{i}.png")
    entry = get_trainer("dreambooth")
    cfg = entry.resolve(images=str(folder), out=str(tmp_path / "b.safetensors"), class_word="dog", steps=3,
                        log_every=0, seed=0, buckets=True, probe=False, prior_preservation=False)
    result = train(entry, cfg, base)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
