"""Single-file checkpoints: header reading, family detection, offline loading and export.

* Detection is tested on synthetic headers with the real SD 1.5 / SD 2.1 / SDXL tensor names and
  shapes, built without weights: the shipped configs are instantiated on the meta device and their
  diffusers names mapped to the original LDM names (``to_ldm_state_dict``); the mapping itself is
  checked against diffusers' own LDM→diffusers converters and against well-known real names.
* Loading is tested end to end on genuine single files: tiny random pipelines of each family are
  written in LDM naming, loaded back offline (sockets refused), compared weight by weight, against
  diffusers' own ``from_single_file``, and run for 2 denoising steps at 32 px.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from studio.errors import BaseModelError
from studio.models.families import SingleFileInfo, detect_family
from studio.models.single_file import (
    CONFIG_ROOT,
    load_single_file,
    read_safetensors_header,
    save_single_file,
    shipped_config_dir,
    to_ldm_state_dict,
)
from studio.models.tiny import TOKENIZER_DIR


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))  # the test machines are shared
    yield
    torch.set_num_threads(before)


# ============================================================================================
# Real-size headers from the shipped configs (meta device, no weights)

CONFIGS = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}  # config folder -> family


def meta_components(folder: str) -> dict[str, torch.nn.Module]:
    """The shipped config's models with every parameter on the meta device."""
    root = CONFIG_ROOT / folder
    out: dict[str, torch.nn.Module] = {}
    with init_empty_weights():
        out["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "unet")))
        out["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
        if (root / "text_encoder_2").is_dir():
            out["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(str(root / "text_encoder_2")))
    return out


@pytest.fixture(scope="module")
def real() -> dict[str, tuple[dict[str, torch.nn.Module], dict[str, list[int]]]]:
    """config folder -> (meta components, header shapes as in the published single files)."""
    out = {}
    for folder, family in CONFIGS.items():
        comps = meta_components(folder)
        shapes = {k: list(v.shape) for k, v in to_ldm_state_dict(comps, family).items()}
        # What the original files hold beyond what diffusers keeps: LDM's noise-schedule buffers,
        # CLIP's position_ids, and for SD 2 the OpenCLIP tower's unused 24th layer + projection.
        shapes.update({"alphas_cumprod": [1000], "betas": [1000], "model_ema.decay": []})
        if family == "sd1":
            shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = [1, 77]
        if family == "sd2":
            for k, v in list(shapes.items()):
                if k.startswith("cond_stage_model.model.transformer.resblocks.22."):
                    shapes[k.replace(".resblocks.22.", ".resblocks.23.")] = v
            shapes.update({"cond_stage_model.model.text_projection": [1024, 1024],
                           "cond_stage_model.model.logit_scale": []})
        if family == "sdxl":
            shapes.update({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": [1, 77],
                           "conditioner.embedders.1.model.logit_scale": []})
        out[folder] = (comps, shapes)
    return out


def test_shipped_configs_have_the_published_sizes(real):
    # Published parameter counts of SD 1.5, SD 2.1, SDXL base 1.0 and their encoders / VAE.
    expected = {"sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
                "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
                "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                         "text_encoder_2": 694_659_840}}
    expected["sd2-v"] = expected["sd2"]
    for folder, (comps, _) in real.items():
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items()}
        assert counts == expected[folder], folder


@pytest.mark.parametrize("folder, fields", [
    ("sd1", dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, sample_size=64,
                 act="quick_gelu", heads=12, pred="epsilon", scaling_factor=0.18215)),
    ("sd2", dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 upcast_attention=False, sample_size=64, act="gelu", heads=16, pred="epsilon")),
    ("sd2-v", dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                   upcast_attention=True, sample_size=96, act="gelu", heads=16, pred="v_prediction")),
    ("sdxl", dict(cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
                  addition_embed_type="text_time", projection_class_embeddings_input_dim=2816,
                  transformer_layers_per_block=[1, 2, 10], sample_size=128, act="quick_gelu", heads=12,
                  act_2="gelu", heads_2=20, pred="epsilon", scaling_factor=0.13025)),
])
def test_shipped_config_fields(folder, fields):
    root = CONFIG_ROOT / folder
    load = lambda rel: json.loads((root / rel).read_text())  # noqa: E731
    unet, vae, te = load("unet/config.json"), load("vae/config.json"), load("text_encoder/config.json")
    assert load("scheduler/scheduler_config.json")["prediction_type"] == fields.pop("pred")
    assert te["hidden_act"] == fields.pop("act") and te["num_attention_heads"] == fields.pop("heads")
    if "act_2" in fields:
        te2 = load("text_encoder_2/config.json")
        assert te2["hidden_act"] == fields.pop("act_2") and te2["num_attention_heads"] == fields.pop("heads_2")
    if "scaling_factor" in fields:
        assert vae["scaling_factor"] == fields.pop("scaling_factor")
    assert {k: unet[k] for k in fields} == fields


@pytest.mark.parametrize("folder", list(CONFIGS))
def test_ldm_names_match_diffusers_converters(real, folder):
    """Our diffusers→LDM names, converted back by diffusers' own converters, give the models' names."""
    comps, _ = real[folder]
    family = CONFIGS[folder]
    ldm = to_ldm_state_dict(comps, family)
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        back = convert(ldm, dict(comps[name].config))
        want = comps[name].state_dict()
        assert {k: list(v.shape) for k, v in back.items()} == {k: list(v.shape) for k, v in want.items()}, name
    for name in ("text_encoder", "text_encoder_2"):
        if name not in comps:
            continue
        model = comps[name]
        if family == "sd1" or name == "text_encoder" and family == "sdxl":
            back = convert_ldm_clip_checkpoint(ldm)
        else:
            prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
            back = convert_open_clip_checkpoint(model, ldm, prefix=prefix)
        want = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: list(v.shape)
                for k, v in model.state_dict().items()}
        assert {k: list(v.shape) for k, v in back.items()} == want, name


def test_synthetic_headers_use_the_real_names(real):
    """Spot checks against names and shapes known from the published single files."""
    sd1, sd2, sdxl = real["sd1"][1], real["sd2-v"][1], real["sdxl"][1]
    assert CHECKPOINT_KEY_NAMES["v1"] in sd1 and CHECKPOINT_KEY_NAMES["clip"] in sd1
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == [320, 320, 1, 1]
    assert sd1["model.diffusion_model.output_blocks.2.1.conv.weight"] == [1280, 1280, 3, 3]
    assert sd1["first_stage_model.decoder.mid.attn_1.q.weight"] == [512, 512, 1, 1]
    assert sd1["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == [49408, 768]
    assert len([k for k in sd1 if k.startswith("model.diffusion_model.")]) == 686
    assert sd2[CHECKPOINT_KEY_NAMES["v2"]] == [320, 1024]
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == [3072, 1024]
    assert sd2["cond_stage_model.model.positional_embedding"] == [77, 1024]
    assert CHECKPOINT_KEY_NAMES["xl_base"] in sdxl
    assert sdxl["model.diffusion_model.label_emb.0.0.weight"] == [1280, 2816]
    assert sdxl["conditioner.embedders.1.model.text_projection"] == [1280, 1280]
    assert sdxl["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == [1280, 2048]
    assert sdxl["model.diffusion_model.output_blocks.2.2.conv.weight"] == [1280, 1280, 3, 3]


# ============================================================================================
# detect_family


@pytest.mark.parametrize("folder, metadata, expect", [
    ("sd1", {}, dict(family="sd1", prediction_type=None, text_widths=(768,), native_size=512,
                     cross_attention_dim=768)),
    ("sd2", {"modelspec.architecture": "stable-diffusion-v2-512", "modelspec.resolution": "512x512"},
     dict(family="sd2", prediction_type="epsilon", text_widths=(1024,), native_size=512)),
    ("sd2-v", {"modelspec.prediction_type": "v"}, dict(family="sd2", prediction_type="v_prediction",
                                                        native_size=768)),
    ("sd2-v", {"modelspec.architecture": "stable-diffusion-v2-768-v"}, dict(prediction_type="v_prediction")),
    ("sd2-v", {}, dict(family="sd2", prediction_type=None, native_size=768)),  # unlabelled SD 2: 768 guess
    ("sdxl", {}, dict(family="sdxl", prediction_type=None, text_widths=(768, 1280), native_size=1024,
                      cross_attention_dim=2048)),
    ("sdxl", {"ss_v_parameterization": "True"}, dict(prediction_type="v_prediction")),
    ("sd1", {"modelspec.prediction_type": "epsilon"}, dict(prediction_type="epsilon")),
])
def test_detect_family_on_real_headers(real, folder, metadata, expect):
    info = detect_family(real[folder][1], metadata)
    assert isinstance(info, SingleFileInfo)
    assert info.in_channels == 4 and info.layout == "ldm" and not info.is_inpainting
    assert {k: getattr(info, k) for k in expect} == expect


def test_detect_markers_and_inpainting(real):
    shapes = dict(real["sdxl"][1], v_pred=[0], ztsnr=[0])
    info = detect_family(shapes)
    assert info.prediction_type == "v_prediction" and info.zero_terminal_snr
    inpaint = dict(real["sd1"][1])
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = [320, 9, 3, 3]
    assert detect_family(inpaint).is_inpainting


def test_detect_diffusers_layout(real):
    for folder, family in CONFIGS.items():
        shapes = {f"{c}.{k}": list(v.shape) for c, m in real[folder][0].items() for k, v in m.state_dict().items()}
        info = detect_family(shapes)
        assert (info.family, info.layout) == (family, "diffusers"), folder


def _only(shapes: dict[str, list[int]], prefix: str, strip: bool = False) -> dict[str, list[int]]:
    return {(k[len(prefix):] if strip else k): v for k, v in shapes.items() if k.startswith(prefix)}


def _bad_headers(real) -> dict[str, tuple[dict[str, list[int]], dict[str, str], str]]:
    sd1, sd2, sdxl = real["sd1"][1], real["sd2"][1], real["sdxl"][1]
    unet_sd1 = real["sd1"][0]["unet"].state_dict()
    return {
        "kohya lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320, 1, 1],
                        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": [320, 4, 1, 1],
                        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": []},
                       {"ss_network_module": "networks.lora"}, "LoRA"),
        "peft lora": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": [4, 320],
                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": [320, 4]},
                      {}, "LoRA"),
        "embedding": ({"emb_params": [2, 768]}, {}, "textual-inversion"),
        "vae only": (_only(sd1, "first_stage_model.", strip=True), {}, "VAE"),
        "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": [9216],
                 "model.diffusion_model.x_embedder.proj.weight": [1536, 16, 2, 2]}, {}, "Stable Diffusion 3"),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": [128], "img_in.weight": [3072, 64]}, {}, "Flux"),
        "controlnet": ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3],
                        "control_model.time_embed.0.weight": [1280, 320]}, {}, "ControlNet"),
        "refiner": ({k.replace("embedders.1.", "embedders.0."): v for k, v in sdxl.items()
                     if not k.startswith("conditioner.embedders.0.")}, {}, "refiner"),
        "unknown": ({"backbone.layer1.weight": [64, 3, 7, 7], "head.bias": [1000]}, {},
                    "not a Stable Diffusion checkpoint"),
        "empty": ({}, {}, "no tensors"),
        "unet only": (_only(sd1, "model.diffusion_model."), {}, "only an SD 1-like UNet"),
        "no vae": ({k: v for k, v in sd1.items() if not k.startswith("first_stage_model.")}, {}, "no VAE"),
        "mixed parts": ({**_only(sd1, "model.diffusion_model."), **_only(sd1, "first_stage_model."),
                         **_only(sd2, "cond_stage_model.")}, {}, "mixes parts"),
        "depth model": ({**sd2, "model.diffusion_model.input_blocks.0.0.weight": [320, 5, 3, 3]}, {},
                        "5 input channels"),
        "diffusers unet file": ({k: list(v.shape) for k, v in unet_sd1.items()}, {}, "whole diffusers folder"),
    }


def test_detect_refuses_what_is_not_a_base(real):
    for case, (shapes, metadata, words) in _bad_headers(real).items():
        with pytest.raises(BaseModelError) as err:
            detect_family(shapes, metadata, source="x.safetensors")
        message = str(err.value)
        assert words in message, (case, message)
        assert message.startswith("x.safetensors") and message.count(". ") == 0, (case, message)  # one sentence


def test_detection_relies_on_structure_not_sizes():
    # A 32-wide SD 1-like model is sd1 by its naming; nothing checks the real widths.
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": [32, 4, 3, 3],
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [32, 32],
              "first_stage_model.decoder.conv_in.weight": [32, 4, 3, 3],
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 32]}
    info = detect_family(shapes)
    assert (info.family, info.text_widths, info.native_size) == ("sd1", (32,), 512)


# ============================================================================================
# read_safetensors_header


@pytest.fixture()
def small_file(tmp_path) -> Path:
    path = tmp_path / "small.safetensors"
    save_file({"a.weight": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path),
              metadata={"modelspec.title": "small"})
    return path


def test_read_header_roundtrip(small_file):
    shapes, metadata = read_safetensors_header(small_file)
    assert shapes == {"a.weight": [2, 3], "b": [4]}
    assert metadata == {"modelspec.title": "small"}


def _with_header(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("case, words", [
    ("truncated", "truncated"), ("empty", "truncated or empty"), ("garbage", "not a .safetensors"),
    ("bad json", "corrupt"), ("bad sizes", "needs 24 bytes"), ("bad metadata", "__metadata__"),
    ("zip pickle", "PyTorch pickle"), ("ckpt suffix", "PyTorch pickle"), ("missing", "does not exist"),
    ("folder", "is a folder"),
])
def test_read_header_refuses_bad_files(tmp_path, small_file, case, words):
    data = small_file.read_bytes()
    path = tmp_path / "bad.safetensors"
    if case == "truncated":
        path.write_bytes(data[:-5])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif case == "bad json":
        path.write_bytes(struct.pack("<Q", 9) + b"{not json")
    elif case == "bad sizes":
        _with_header(path, {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "bad metadata":
        _with_header(path, {"__metadata__": {"k": 1}})
    elif case == "zip pickle":
        path.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    elif case == "ckpt suffix":
        path = tmp_path / "model.ckpt"
        path.write_bytes(data)
    elif case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "folder":
        path = tmp_path
    with pytest.raises(BaseModelError, match=words) as err:
        read_safetensors_header(path)
    if case not in ("missing", "folder"):
        assert path.name in str(err.value)


# ============================================================================================
# End to end: tiny genuine single files, loaded offline


def _text_config(width: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=width)


def tiny_pipeline(family: str, in_channels: int = 4):
    """A seeded random pipeline with the family's real architecture at toy widths."""
    torch.manual_seed(0)
    tok = lambda pad: CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad)  # noqa: E731
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8, sample_size=32)
    if family == "sdxl":  # CLIP-L-like 32-d + OpenCLIP-bigG-like 48-d encoders, text_time conditioning
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=in_channels, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=80,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 48, norm_num_groups=8)
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(48, "gelu")), tokenizer=tok("<|endoftext|>"),
            tokenizer_2=tok("!"), unet=unet, scheduler=sched)
    v = family == "sd2"  # OpenCLIP-like encoder (exact GELU), linear projections, v-prediction
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, use_linear_projection=v, cross_attention_dim=32, norm_num_groups=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if v else "epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(32, "gelu" if v else "quick_gelu")),
        tokenizer=tok("!" if v else "<|endoftext|>"), unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def write_config_folder(pipe, folder: Path) -> Path:
    """A diffusers-style config folder (no weights) describing ``pipe``."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).config.save_pretrained(folder / name)
    return folder


@pytest.fixture()
def offline(monkeypatch):
    """Refuse every socket; the list records attempts that a library might have swallowed."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts[:3]}"


def _generate(pipe) -> np.ndarray:
    return pipe(prompt="a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _assert_same_weights(a, b, names) -> None:
    for name in names:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_single_file_roundtrip(tmp_path, offline, family):
    pipe = tiny_pipeline(family)
    path = save_single_file(pipe, tmp_path / f"tiny-{family}.safetensors")
    config = write_config_folder(pipe, tmp_path / "config")

    # The header alone tells the family, from structure (the widths are 32 and 48, not 768/1024/1280).
    info = detect_family(*read_safetensors_header(path))
    widths = {"sd1": (32,), "sd2": (32,), "sdxl": (32, 48)}[family]
    assert (info.family, info.text_widths, info.layout) == (family, widths, "ldm")
    assert info.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")  # export writes modelspec

    loaded = load_single_file(path, device="cpu", dtype=torch.float32, config=config)
    assert type(loaded) is type(pipe)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    _assert_same_weights(pipe, loaded, components)
    assert loaded.tokenizer.pad_token == ("!" if family == "sd2" else "<|endoftext|>")
    if family == "sdxl":
        assert loaded.tokenizer_2.pad_token == "!"
    assert type(loaded.scheduler) is type(pipe.scheduler)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)

    # Parity with diffusers' own single-file loader on the same file and configs.
    cls = type(pipe)
    extra = {"tokenizer_2": pipe.tokenizer_2} if family == "sdxl" else {}
    theirs = cls.from_single_file(str(path), config=str(config), local_files_only=True, tokenizer=pipe.tokenizer,
                                  scheduler=pipe.scheduler, **extra)
    _assert_same_weights(theirs, loaded, components)

    if family == "sd2":
        return  # same pipeline class and code path as sd1; only the names and the pad token differ (checked)
    loaded.set_progress_bar_config(disable=True)
    images = _generate(loaded)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    if family == "sd1":  # same weights, tokenizer and scheduler: the same image as the original pipeline
        pipe.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(images, _generate(pipe), atol=1e-5)


def test_prediction_type_override_and_default(tmp_path, offline, caplog):
    pipe = tiny_pipeline("sd1")
    path = save_single_file(pipe, tmp_path / "tiny.safetensors", metadata={"modelspec.title": "tiny"})
    config = write_config_folder(pipe, tmp_path / "config")
    assert read_safetensors_header(path)[1]["modelspec.title"] == "tiny"
    with caplog.at_level(logging.WARNING, logger="studio.models.single_file"):
        loaded = load_single_file(path, device="cpu", dtype=torch.bfloat16, config=config,
                                  prediction_type="v_prediction")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}, name
    assert "epsilon" in caplog.text  # the file said epsilon; the caller's choice wins, with a warning
    assert shipped_config_dir("sd2", "epsilon").name == "sd2"
    assert shipped_config_dir("sd2", "v_prediction").name == "sd2-v"


def test_load_refuses_mismatched_config_and_inpainting(tmp_path, offline):
    path = save_single_file(tiny_pipeline("sd1"), tmp_path / "tiny.safetensors")
    # Without config=, the shipped SD 1.5 config is used: the tiny file does not fit it.
    with pytest.raises(BaseModelError, match=r"does not match the sd1 configuration: .* is \[32, 4, 3, 3\]"):
        load_single_file(path, device="cpu", dtype=torch.float32)
    inpaint = save_single_file(tiny_pipeline("sd1", in_channels=9), tmp_path / "inpaint.safetensors")
    with pytest.raises(BaseModelError, match="inpainting"):
        load_single_file(inpaint, device="cpu", dtype=torch.float32)


def test_load_refuses_a_lora_file(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(BaseModelError, match="style.safetensors looks like a LoRA"):
        load_single_file(path, device="cpu", dtype=torch.float32)


def test_load_tolerates_real_world_extras_and_old_clip_names(tmp_path, offline):
    """Old SD 1 files: CLIP names without ``text_model.``, a stale float position_ids, EMA copies
    and LDM's schedule buffers. All are read or skipped; the weights still match."""
    pipe = tiny_pipeline("sd1")
    config = write_config_folder(pipe, tmp_path / "config")
    tensors = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v.clone()
               for k, v in to_ldm_state_dict(
                   {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder")}, "sd1").items()}
    tensors.update({"cond_stage_model.transformer.embeddings.position_ids": torch.arange(77.0)[None],
                    "alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.999),
                    "model_ema.diffusion_modelout2weight": torch.zeros(4, 32, 3, 3)})
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path))
    loaded = load_single_file(path, device="cpu", dtype=torch.float32, config=config)
    _assert_same_weights(pipe, loaded, ["unet", "vae", "text_encoder"])

    prefixed = tmp_path / "diffusers-style.safetensors"
    save_file({f"{n}.{k}": v.contiguous() for n in ("unet", "vae", "text_encoder")
               for k, v in getattr(pipe, n).state_dict().items()}, str(prefixed))
    assert detect_family(*read_safetensors_header(prefixed)).layout == "diffusers"
    with pytest.raises(BaseModelError, match="pass the diffusers folder"):
        load_single_file(prefixed, device="cpu", dtype=torch.float32, config=config)
