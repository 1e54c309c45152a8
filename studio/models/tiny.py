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
tiny-sd3    SD 3 / 3.5 (MMDiT, two CLIPs + T5, flow)      32 px
tiny-flux   FLUX.1-dev (MMDiT + single-stream blocks,     32 px
            CLIP pooled + T5, embedded guidance, flow)
==========  ===========================================  ==========================

The flow bases (``tiny-sd3``, ``tiny-flux``) keep the real structure that the studio relies on: a
16-channel VAE without quant convs (with the family's scaling and shift factors), CLIP encoders
with the CLIP BPE tokenizer, a T5 encoder (gated-GELU, relative positions) whose tokenizer is built
in code by :func:`build_t5_tokenizer` (a small Unigram vocabulary, no download), a flow-matching
Euler scheduler with the family's shift settings, and the transformer's joint text-image blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_NAMES = ("tiny", "tiny-v", "tiny-sdxl", "tiny-sd3", "tiny-flux")
FLOW_TINY_NAMES = ("tiny-sd3", "tiny-flux")
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
    """Build ``tiny`` / ``tiny-v`` / ``tiny-sdxl`` / ``tiny-sd3`` / ``tiny-flux`` on CPU in fp32,
    deterministically from ``seed``."""
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
    if name in FLOW_TINY_NAMES:
        try:
            flow_pipe = _build_flow_pipeline(name)
        finally:
            torch.random.set_rng_state(gen_state)
        flow_pipe.set_progress_bar_config(disable=True)
        return flow_pipe
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


# ---------------------------------------------------------------------------------------------
# Flow-matching families (SD 3 / 3.5, FLUX.1)

# A word list for the T5 tokenizer's vocabulary: frequent prompt words, so that ordinary prompts
# become words rather than letters. Any other text still tokenizes (letters, digits, punctuation
# are pieces of their own; characters outside them map to <unk>).
_T5_WORDS = ("a an the of on in at with and or photo painting picture drawing image portrait close up "
             "cat dog man woman person car house tree beach mountain sky city street room table chair "
             "red blue green yellow black white pink purple orange brown gray "
             "small big large old new bright dark light sunset night day water river lake sea forest "
             "watercolor oil sketch style art by high quality detailed").split()


def build_t5_tokenizer(max_length: int = 512):
    """A small T5-style tokenizer built in code (no download, deterministic).

    A ``tokenizers`` Unigram model with T5's special ids (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2),
    its SentencePiece-style ``▁`` word boundaries, and ``</s>`` appended to every sequence, wrapped in
    ``T5TokenizerFast`` — what SD 3's and FLUX's pipelines call. The vocabulary (about 250 pieces) is
    :data:`_T5_WORDS` as whole words plus every ASCII letter, digit and punctuation mark with and
    without a leading ``▁``.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # exported lazily

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -4.0}
    for word in _T5_WORDS:
        pieces.setdefault("\u2581" + word, -1.0 - 0.01 * len(word))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault("\u2581" + ch, -3.0)
        pieces.setdefault(ch, -3.5)
    tok = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    t5.model_max_length = max_length
    return t5


def _t5_encoder(width: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    ))


def _flow_vae(*, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def _build_flow_pipeline(name: str) -> Any:
    """``tiny-sd3``: CLIP-L-like (32) + CLIP-G-like (48) + T5 (96) → an SD3 MMDiT with 2 joint blocks, a
    dual-attention first block and RMS q/k norms (SD 3.5's features), patch 2, static shift 3.
    ``tiny-flux``: CLIP-L-like (32, pooled) + T5 (64) → a FLUX transformer with 1 double-stream and 1
    single-stream block, RoPE over 3 axes, the guidance embedder (FLUX.1-dev), dynamic shifting."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    t5_tok = build_t5_tokenizer()
    vocab = len(t5_tok)
    if name == "tiny-sd3":
        te1 = CLIPTextModelWithProjection(_text_config(width=32, act="quick_gelu", projection_dim=32))
        te2 = CLIPTextModelWithProjection(_text_config(width=48, act="gelu", projection_dim=48))
        te3 = _t5_encoder(96, vocab)
        transformer: Any = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=32 + 48,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        sched: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=sched, vae=_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=te1, tokenizer=load_clip_tokenizer(), text_encoder_2=te2,
            tokenizer_2=load_clip_tokenizer(pad_token="!"), text_encoder_3=te3, tokenizer_3=t5_tok,
        )
    te = CLIPTextModel(_text_config(width=32, act="quick_gelu"))
    t5 = _t5_encoder(64, vocab)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe: Any = FluxPipeline(scheduler=sched, vae=_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
                             text_encoder=te, tokenizer=load_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok,
                             transformer=transformer)
    pipe.default_sample_size = 16  # latent px (FLUX's transformer has no sample size): 32-px images
    return pipe
