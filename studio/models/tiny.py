"""Tiny offline bases built from config with seeded random weights (tests and a labelled demo).

They have the real architecture of each family — CLIP text encoder(s) with the real 49,408-token
CLIP BPE tokenizer, a UNet with cross-attention at two resolutions, an ``AutoencoderKL`` — at
toy widths, so every code path of the studio runs in seconds on a CPU. Random weights draw noise:
they show that code runs, not that it learns (the learnable world, ``--base demo``, does that).

==========  ===========================================  ==========================
name        imitates                                      native size
==========  ===========================================  ==========================
tiny        SD 1.x (ε-prediction, CLIP-L-like encoder)   32 px
tiny-v      SD 2.x (v-prediction, OpenCLIP-like encoder)  32 px
tiny-sdxl   SDXL (two encoders, text_time conditioning)   32 px
==========  ===========================================  ==========================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_NAMES = ("tiny", "tiny-v", "tiny-sdxl")
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"
TINY_BUILD_VERSION = 1  # bump when the builders change: it is part of the identity key


def load_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The committed CLIP BPE tokenizer. SD 1 pads with ``<|endoftext|>``; SD 2 / SDXL's
    OpenCLIP tokenizers pad with ``!`` (id 0)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def _text_config(*, width: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def build_tiny_pipeline(name: str, seed: int = 0):
    """Build ``tiny`` / ``tiny-v`` / ``tiny-sdxl`` on CPU in fp32, deterministically from ``seed``."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny base {name!r}; one of {TINY_NAMES}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    # ``sched`` / ``pipe`` are ``Any``: to mypy, diffusers' lazy top-level exports are its unrelated
    # dummy placeholder classes (no common base, no DiffusionPipeline methods).
    try:
        if name == "tiny-sdxl":
            unet = UNet2DConditionModel(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
            )
            vae = _vae()
            te1 = CLIPTextModel(_text_config(width=32, act="quick_gelu"))
            te2 = CLIPTextModelWithProjection(_text_config(width=32, act="gelu", projection_dim=32))
            sched: Any = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")
            pipe: Any = StableDiffusionXLPipeline(
                vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=load_clip_tokenizer(),
                tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet, scheduler=sched,
                force_zeros_for_empty_prompt=True,
            )
        else:
            v = name == "tiny-v"
            unet = UNet2DConditionModel(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4) if v else 4, use_linear_projection=v,
                cross_attention_dim=32, norm_num_groups=8,
            )
            vae = _vae()
            te = CLIPTextModel(_text_config(width=32, act="gelu" if v else "quick_gelu"))
            sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction" if v else "epsilon")
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer(pad_token="!" if v else "<|endoftext|>"),
                unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
    finally:
        torch.random.set_rng_state(gen_state)
    pipe.set_progress_bar_config(disable=True)
    return pipe
