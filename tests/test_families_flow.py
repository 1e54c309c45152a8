"""SD 3 / 3.5 and FLUX.1: single-file detection, the tiny flow bases, generation, the CLI, refusals.

Single-file headers are built with the real tensor names and shapes: the transformers' original names
(``joint_blocks.i.x_block.attn.qkv`` …, ``double_blocks.i.img_attn.qkv`` …) at their published widths
and depths, the bundled VAE and text encoders from the shipped configs on the meta device (no weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from studio.concept import Concept
from studio.errors import BaseModelError, IncompatibleConceptError, StudioError
from studio.generation import GenerateConfig, generate
from studio.models import load_base
from studio.models.families import detect_family
from studio.models.single_file_flow import CONFIG_ROOT

Header = dict[str, list[int]]
LDM = "model.diffusion_model."


# ---------------------------------------------------------------------------------------------
# Headers with real names and shapes

def _meta_state(folder: Path, class_name: str, library: str) -> dict[str, list[int]]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        if library == "transformers":
            import transformers

            cls: Any = getattr(transformers, class_name)
            model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
        else:
            import diffusers

            cls = getattr(diffusers, class_name)
            model = cls.from_config(cls.load_config(str(folder)))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _vae(variant: str) -> Header:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from studio.models.ldm_names import _vae_to_ldm

    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIG_ROOT / variant / "vae")))
    return {k: list(v.shape) for k, v in _vae_to_ldm(vae).items()}


def _encoders(variant: str, names: tuple[str, ...]) -> Header:
    index = json.loads((CONFIG_ROOT / variant / "model_index.json").read_text())
    slots = {"clip_l": "text_encoder", "clip_g": "text_encoder_2",
             "t5xxl": "text_encoder_3" if "text_encoder_3" in index else "text_encoder_2"}
    out: Header = {}
    for enc in names:
        slot = slots[enc]
        state = _meta_state(CONFIG_ROOT / variant / slot, index[slot][1], "transformers")
        if enc == "t5xxl":
            state.pop("encoder.embed_tokens.weight", None)  # stored once, as ``shared``
        else:  # the files' HF names (transformers 5's CLIPTextModel drops the ``text_model.`` level)
            state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                     for k, v in state.items()}
        out |= {f"text_encoders.{enc}.transformer.{k}": v for k, v in state.items()}
    return out


def sd3_header(variant: str, *, prefix: str = LDM, vae: bool = True,
               encoders: tuple[str, ...] = ("clip_l", "clip_g", "t5xxl")) -> Header:
    """An SD 3 / 3.5 checkpoint header in the original (SAI / ComfyUI) names."""
    h, depth = {"sd3-medium": (1536, 24), "sd3.5-medium": (1536, 24), "sd3.5-large": (2432, 38)}[variant]
    qk, dual = variant != "sd3-medium", variant == "sd3.5-medium"
    pos = 384 * 384 if variant == "sd3.5-medium" else 192 * 192
    t: Header = {"x_embedder.proj.weight": [h, 16, 2, 2], "x_embedder.proj.bias": [h], "pos_embed": [1, pos, h],
                 "t_embedder.mlp.0.weight": [h, 256], "t_embedder.mlp.2.weight": [h, h],
                 "y_embedder.mlp.0.weight": [h, 2048], "y_embedder.mlp.2.weight": [h, h],
                 "context_embedder.weight": [h, 4096], "context_embedder.bias": [h],
                 "final_layer.linear.weight": [64, h], "final_layer.adaLN_modulation.1.weight": [2 * h, h]}
    for i in range(depth):
        last = i == depth - 1
        for part in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{part}."
            mods = 9 if part == "x_block" and dual and i < 13 else 2 if part == "context_block" and last else 6
            t[b + "adaLN_modulation.1.weight"] = [mods * h, h]
            t[b + "attn.qkv.weight"] = [3 * h, h]
            if qk:
                t[b + "attn.ln_q.weight"] = [64]
                t[b + "attn.ln_k.weight"] = [64]
            if part == "x_block" and dual and i < 13:
                t[b + "attn2.qkv.weight"] = [3 * h, h]
                t[b + "attn2.proj.weight"] = [h, h]
            if not (part == "context_block" and last):
                t[b + "attn.proj.weight"] = [h, h]
                t[b + "mlp.fc1.weight"] = [4 * h, h]
                t[b + "mlp.fc2.weight"] = [h, 4 * h]
    out = {prefix + k: v for k, v in t.items()}
    return out | (_vae(variant) if vae else {}) | _encoders(variant, encoders)


def flux_header(variant: str, *, prefix: str = "", vae: bool = False, encoders: tuple[str, ...] = (),
                img_in: int = 64, depth: tuple[int, int] = (19, 38)) -> Header:
    """A FLUX.1 header: BFL release names (bare) or a ComfyUI checkpoint (``model.diffusion_model.``)."""
    h = 3072
    t: Header = {"img_in.weight": [h, img_in], "txt_in.weight": [h, 4096], "time_in.in_layer.weight": [h, 256],
                 "time_in.out_layer.weight": [h, h], "vector_in.in_layer.weight": [h, 768],
                 "vector_in.out_layer.weight": [h, h], "final_layer.linear.weight": [64, h],
                 "final_layer.adaLN_modulation.1.weight": [2 * h, h]}
    if variant == "flux-dev":
        t |= {"guidance_in.in_layer.weight": [h, 256], "guidance_in.out_layer.weight": [h, h]}
    for i in range(depth[0]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}_"
            t |= {b + "mod.lin.weight": [6 * h, h], b + "attn.qkv.weight": [3 * h, h],
                  b + "attn.norm.query_norm.scale": [128], b + "attn.norm.key_norm.scale": [128],
                  b + "attn.proj.weight": [h, h], b + "mlp.0.weight": [4 * h, h], b + "mlp.2.weight": [h, 4 * h]}
    for i in range(depth[1]):
        b = f"single_blocks.{i}."
        t |= {b + "linear1.weight": [7 * h, h], b + "linear2.weight": [h, 5 * h], b + "modulation.lin.weight": [3 * h, h],
              b + "norm.query_norm.scale": [128], b + "norm.key_norm.scale": [128]}
    out = {prefix + k: v for k, v in t.items()}
    return out | (_vae(variant) if vae else {}) | _encoders(variant, encoders)


# ---------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_detects_sd3_variants(variant):
    info = detect_family(sd3_header(variant))
    assert (info.family, info.variant, info.layout) == ("sd3", variant, "ldm")
    assert info.components == ("transformer", "vae", "clip_l", "clip_g", "t5xxl")
    assert (info.text_widths, info.cross_attention_dim, info.pooled_dim) == ((768, 1280), 4096, 2048)
    assert (info.in_channels, info.native_size, info.prediction_type, info.is_inpainting) == (16, 1024, None, False)
    # the release files without text encoders (sd3.5_large.safetensors): detected, parts reported
    bare = detect_family(sd3_header(variant, vae=False, encoders=()))
    assert (bare.variant, bare.components, bare.text_widths) == (variant, ("transformer",), ())


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_detects_flux_variants(variant):
    bfl = detect_family(flux_header(variant), source="flux1.safetensors")  # BFL release: transformer alone
    assert (bfl.family, bfl.variant, bfl.layout, bfl.components) == ("flux", variant, "bfl", ("transformer",))
    assert (bfl.text_widths, bfl.cross_attention_dim, bfl.in_channels) == ((768, 4096), 4096, 16)
    comfy = detect_family(flux_header(variant, prefix=LDM, vae=True, encoders=("clip_l", "t5xxl")),
                          {"modelspec.resolution": "1024x1024"})
    assert (comfy.variant, comfy.layout) == (variant, "ldm")
    assert comfy.components == ("transformer", "vae", "clip_l", "t5xxl")


def _one_sentence(message: str, source: str = "x.safetensors") -> bool:
    return message.startswith(source) and message.count(". ") == 0


def test_refuses_what_is_not_a_text_to_image_flow_base():
    cases = {
        "fill": (flux_header("flux-dev", img_in=384, depth=(1, 1)), "Fill"),
        "chroma": ({k: v for k, v in flux_header("flux-schnell", depth=(1, 1)).items() if "vector_in" not in k},
                   "Chroma"),
        "one clip": (sd3_header("sd3-medium", encoders=("clip_l",)), "only one"),
        "t5 of another width": ({**sd3_header("sd3-medium", encoders=("clip_l", "clip_g")),
                                 "text_encoders.t5xxl.transformer.shared.weight": [32128, 2048]}, "mixes parts"),
        "sd1 vae": ({**flux_header("flux-dev", prefix=LDM, depth=(1, 1)), **_vae("flux-dev"),
                     "first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3]}, "16-channel VAE"),
        "incomplete sd3": ({LDM + "joint_blocks.0.x_block.attn.qkv.weight": [4608, 1536]}, "incomplete"),
        "flux lora": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [16, 3072],
                       "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": [9216, 16]}, "LoRA"),
        "flux.2": ({"single_stream_modulation.lin.weight": [1, 1], "double_blocks.0.img_attn.qkv.weight": [3, 1]},
                   "FLUX.2"),
    }
    for case, (shapes, words) in cases.items():
        with pytest.raises(BaseModelError) as err:
            detect_family(shapes, source="x.safetensors")
        assert words in str(err.value) and _one_sentence(str(err.value)), (case, str(err.value))


def test_existing_families_are_not_misdetected():
    from studio.models.ldm_names import to_ldm_state_dict
    from studio.models.single_file import family_for_export
    from studio.models.tiny import build_tiny_pipeline

    for name, family in (("tiny", "sd1"), ("tiny-sdxl", "sdxl")):
        pipe = build_tiny_pipeline(name)
        parts = {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
                 if getattr(pipe, n, None) is not None}
        shapes = {k: list(v.shape) for k, v in to_ldm_state_dict(parts, family_for_export(pipe)).items()}
        info = detect_family(shapes)
        assert (info.family, info.variant, info.components) == (family, "", ())


def test_partial_single_file_is_refused_with_the_hub_id(tmp_path, monkeypatch):
    import studio.models.single_file as single_file

    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(b"")
    header = flux_header("flux-dev", depth=(2, 2))
    monkeypatch.setattr(single_file, "read_safetensors_header", lambda p: (header, {}))
    with pytest.raises(BaseModelError) as err:
        load_base(str(path), device="cpu")
    message = str(err.value)
    assert "black-forest-labs/FLUX.1-dev" in message and "vae" in message, message
    assert _one_sentence(message, "flux1-dev.safetensors"), message


def test_shipped_flow_configs_build():
    """Every shipped SD 3 / FLUX config folder names its classes and only arguments they take (the transformer
    is not built: its position buffers alone are hundreds of MB), and the detected variants have a folder."""
    import inspect

    import diffusers

    for variant in ("sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell"):
        index = json.loads((CONFIG_ROOT / variant / "model_index.json").read_text())
        for part in ("transformer", "vae"):
            cls = getattr(diffusers, index[part][1])
            config = cls.load_config(str(CONFIG_ROOT / variant / part))
            unknown = {k for k in config if not k.startswith("_")} - set(inspect.signature(cls.__init__).parameters)
            assert not unknown, (variant, part, unknown)
        sched = json.loads((CONFIG_ROOT / variant / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert sched.get("use_dynamic_shifting", False) == (variant == "flux-dev"), variant


# ---------------------------------------------------------------------------------------------
# Tiny bases, generation, CLI


@pytest.fixture(scope="module")
def bases():
    return {name: load_base(name, device="cpu") for name in ("tiny-sd3", "tiny-flux")}


def test_tiny_flow_bases(bases):
    sd3, flux = bases["tiny-sd3"], bases["tiny-flux"]
    assert (sd3.family, flux.family) == ("sd3", "flux")
    assert (sd3.native_size, flux.native_size) == (32, 32)
    assert (sd3.prediction_type, sd3.guidance_kind, flux.guidance_kind) == ("flow", "cfg", "embedded")
    assert sd3.compat["family"] == "sd3" and flux.compat["family"] == "flux" and sd3.compat_id != flux.compat_id
    assert sd3.dtype == torch.float32 and type(flux.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (flux.profile.steps, flux.profile.guidance) == (28, 3.5)
    no_t5 = load_base("tiny-sd3", device="cpu", t5=False)
    assert no_t5.pipe.text_encoder_3 is None and no_t5.compat == sd3.compat  # T5 is not part of the key
    with pytest.raises(StudioError, match="prediction"):
        load_base("tiny-flux", device="cpu", prediction_type="epsilon")
    tok = flux.pipe.tokenizer_2
    ids = tok("a photo of a red cat, 2 dogs!").input_ids
    assert ids == tok("a photo of a red cat, 2 dogs!").input_ids and ids[-1] == tok.eos_token_id == 1
    assert tok.unk_token_id not in ids and tok.pad_token_id == 0


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_generation_is_deterministic_with_parameters(bases, name):
    base = bases[name]
    negative = "blurry" if name == "tiny-sd3" else ""
    cfg = GenerateConfig(prompt="a photo of a cat", negative_prompt=negative, seed=1, steps=2)
    first, again = generate(base, cfg)[0], generate(base, cfg)[0]
    other = generate(base, GenerateConfig(prompt="a photo of a cat", negative_prompt=negative, seed=2, steps=2))[0]
    assert first.size == (32, 32) and np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))
    text = first.info["parameters"]
    if name == "tiny-flux":
        assert "Steps: 2, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1, Size: 32x32" in text
    else:
        assert "Negative prompt: blurry" in text and "Sampler: Euler, CFG scale: 4.5, Seed: 1" in text
    assert json.loads(first.info["studio"])["base"] == name


def test_flux_embedded_guidance_changes_the_image(bases):
    base = bases["tiny-flux"]
    low, high = (generate(base, GenerateConfig(prompt="a photo of a cat", seed=1, steps=2, guidance=g))[0]
                 for g in (1.0, 6.0))
    assert not np.array_equal(_pixels(low), _pixels(high))


def test_cli_generate_tiny_flux(bases, tmp_path):
    from studio.cli import main

    out = tmp_path / "cat.png"
    assert main(["generate", "--base", "tiny-flux", "--device", "cpu", "--prompt", "a photo of a cat", "--seed", "1",
                 "--steps", "2", "--out", str(out), "--library", str(tmp_path / "lib")]) == 0
    image = Image.open(out)
    assert "Distilled CFG Scale: 3.5" in image.info["parameters"] and "Model: tiny-flux" in image.info["parameters"]
    direct = generate(bases["tiny-flux"], GenerateConfig(prompt="a photo of a cat", seed=1, steps=2))[0]
    assert np.array_equal(_pixels(image), _pixels(direct))


# ---------------------------------------------------------------------------------------------
# Refusals


def test_flow_bases_refuse_clearly(bases):
    from studio.methods.registry import METHODS

    flux, sd3 = bases["tiny-flux"], bases["tiny-sd3"]
    for name, method in METHODS.items():
        if name in ("textual_inversion", "lora"):  # trained and applied on SD 3 / FLUX (tests/test_families_flow_train.py)
            continue
        with pytest.raises(IncompatibleConceptError) as err:
            method.check_base(None, sd3)
        message = str(err.value)
        assert message.count(". ") == 0 and "SD 1.x, 2.x or SDXL" in message, (name, message)
        assert "cross-attention" in message, (name, message)
    # through generation: a concept trained for another family is refused
    ti = Concept(method="textual_inversion", tokens=["<x>"], tensors={"emb_params": torch.zeros(1, 32)},
                 base={"compat": {"family": "sd1"}})
    with pytest.raises(IncompatibleConceptError):
        generate(flux, GenerateConfig(prompt="a photo of <x>", steps=1), [(ti, None, "x.safetensors")])
    for cfg, words in ((GenerateConfig(prompt="a cat", negative_prompt="dog", steps=1), "no negative prompt"),
                       (GenerateConfig(prompt="a cat", scheduler="ddim", steps=1), "flow-matching")):
        with pytest.raises(StudioError, match=words):
            generate(flux, cfg)
    # FLUX.1 takes IP-Adapter image prompts (tests/test_flux_ip_adapter.py); SD 3 refuses them in one sentence
    with pytest.raises(StudioError, match="IP-Adapter"):
        generate(sd3, GenerateConfig(prompt="a cat", reference_images=["x.png"], steps=1))
