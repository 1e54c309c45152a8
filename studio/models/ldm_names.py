"""The original (LDM / A1111) tensor names of a Stable Diffusion checkpoint and diffusers' module names:
UNet, VAE and CLIP / OpenCLIP text encoders, in both directions (:mod:`studio.models.single_file`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from studio.errors import BaseModelError
from studio.models.families import (
    LDM_UNET,
    LDM_VAE,
    TEXT_ENCODER_PREFIXES,
    Family,
)

logger = logging.getLogger(__name__)



def _canonical_text_keys(model: torch.nn.Module) -> dict[str, str]:
    """model state-dict key → canonical key with the ``text_model.`` prefix (transformers ≥ 5.6
    flattened ``CLIPTextModel`` but not ``CLIPTextModelWithProjection``)."""
    return {k: k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
            for k in model.state_dict()}


_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def _openclip_name(canonical: str) -> tuple[str, int | None]:
    """Canonical HF key → (open_clip key, which third of the fused q/k/v it is, or None)."""
    if canonical == "text_projection.weight":
        return "text_projection", None
    key = canonical.removeprefix("text_model.")
    if key in _OPENCLIP_FIXED:
        return _OPENCLIP_FIXED[key], None
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        base, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            return f"{base}attn.in_proj_{qkv.group(2)}", "qkv".index(qkv.group(1))
        for ours, theirs in _OPENCLIP_LAYER:
            if rest.startswith(ours):
                return base + theirs + rest[len(ours):], None
    raise ValueError(f"no open_clip name for text-encoder tensor {canonical}")


def _text_to_ldm(model: torch.nn.Module, prefix: str, naming: str) -> dict[str, torch.Tensor]:
    keys = _canonical_text_keys(model)
    state = model.state_dict()
    if naming == "hf":
        return {prefix + canon: state[k] for k, canon in keys.items() if canon.startswith("text_model.")}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for k, canon in keys.items():
        name, third = _openclip_name(canon)
        if third is not None:
            fused.setdefault(name, {})[third] = state[k]
        else:
            out[prefix + name] = state[k].t() if name == "text_projection" else state[k]
    for name, parts in fused.items():  # (3·D, D) / (3·D,): q, k, v stacked like nn.MultiheadAttention
        out[prefix + name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def _text_from_ldm(model: torch.nn.Module, get: Callable[[str], torch.Tensor | None], prefix: str, naming: str, *,
                   source: str) -> dict[str, torch.Tensor]:
    """The model's state dict read from LDM names; ``get(name)`` returns a tensor or None."""
    state: dict[str, torch.Tensor] = {}
    for k, canon in _canonical_text_keys(model).items():
        if naming == "hf":
            candidates = [prefix + canon, prefix + canon.removeprefix("text_model.")]  # + pre-2022 names
            tensor = next((t for t in map(get, candidates) if t is not None), None)
            name = candidates[0]
        else:
            rel, third = _openclip_name(canon)
            name = prefix + rel
            tensor = get(name)
            if tensor is not None and third is not None:
                tensor = tensor.chunk(3, dim=0)[third]
            elif tensor is not None and rel == "text_projection":
                tensor = tensor.t()
        if tensor is None:
            raise BaseModelError(f"{source} lacks the text-encoder tensor {name}, so it is incomplete; "
                                 "pass a full checkpoint.")
        state[k] = tensor.contiguous()
    return state


# =============================================================================================
# UNet and VAE: diffusers names -> LDM names

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_rest(parts: list[str]) -> str:
    return ".".join([_RESNET.get(parts[0], parts[0]), *parts[1:]])


def _unet_name(key: str, layers: int, up_attention: set[int]) -> str:
    p = key.split(".")
    if p[0] == "down_blocks":
        i, kind = int(p[1]), p[2]
        first = 1 + i * (layers + 1)  # input_blocks.0 is conv_in; each level has L layers + a downsampler
        if kind == "resnets":
            return f"input_blocks.{first + int(p[3])}.0.{_resnet_rest(p[4:])}"
        if kind == "attentions":
            return f"input_blocks.{first + int(p[3])}.1.{'.'.join(p[4:])}"
        if kind == "downsamplers":  # downsamplers.0.conv.* -> op.*
            return f"input_blocks.{first + layers}.0.op.{'.'.join(p[5:])}"
    elif p[0] == "up_blocks":
        i, kind = int(p[1]), p[2]
        first = i * (layers + 1)  # each level has L + 1 layers; the last one carries the upsampler
        if kind == "resnets":
            return f"output_blocks.{first + int(p[3])}.0.{_resnet_rest(p[4:])}"
        if kind == "attentions":
            return f"output_blocks.{first + int(p[3])}.1.{'.'.join(p[4:])}"
        if kind == "upsamplers":
            return f"output_blocks.{first + layers}.{2 if i in up_attention else 1}.{'.'.join(p[4:])}"
    elif p[0] == "mid_block":
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}.{_resnet_rest(p[3:])}"
        if p[1] == "attentions":
            return f"middle_block.1.{'.'.join(p[3:])}"
    else:
        for ours, theirs in _UNET_TOP.items():
            if key.startswith(ours + "."):
                return theirs + key[len(ours):]
    raise ValueError(f"no LDM name for UNet tensor {key}")


def _unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    config: Any = unet.config
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise BaseModelError(f"A UNet with per-level layers_per_block={layers} has no single-file (LDM) layout.")
    state = unet.state_dict()
    up_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    return {LDM_UNET + _unet_name(k, layers, up_attention): v for k, v in state.items()}


def _vae_name(key: str, n_up: int) -> str:
    p = key.split(".")
    if p[0] not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    side, block = p[0], p[1]
    if block == "conv_norm_out":
        return f"{side}.norm_out.{'.'.join(p[2:])}"
    if block in ("down_blocks", "up_blocks"):
        level = int(p[2]) if block == "down_blocks" else n_up - 1 - int(p[2])  # LDM numbers up-levels bottom-up
        where = "down" if block == "down_blocks" else "up"
        if p[3] == "resnets":
            rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{where}.{level}.block.{p[4]}.{rest}"
        sampler = "downsample" if block == "down_blocks" else "upsample"
        return f"{side}.{where}.{level}.{sampler}.{'.'.join(p[5:])}"  # {down,up}samplers.0.conv.*
    if block == "mid_block":
        if p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.mid.block_{int(p[3]) + 1}.{rest}"
        rest = ".".join(p[4:])
        for ours, theirs in _VAE_ATTN.items():
            if rest.startswith(ours + "."):
                return f"{side}.mid.attn_1.{theirs}{rest[len(ours):]}"
        raise ValueError(f"no LDM name for VAE tensor {key}")
    return key  # conv_in, conv_out


def _vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    config: Any = vae.config
    n_up = len(config["up_block_types"])
    out = {}
    for k, v in vae.state_dict().items():
        name = _vae_name(k, n_up)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # LDM's attention projections are 1×1 convs
        out[LDM_VAE + name] = v
    return out


# =============================================================================================
# Export


def to_ldm_state_dict(components: Mapping[str, torch.nn.Module], family: Family) -> dict[str, torch.Tensor]:
    """The single-file (LDM) state dict of ``unet``, ``vae`` and ``text_encoder``/``text_encoder_2``.

    Works on any device, ``meta`` included (then only names and shapes are meaningful). Tensors
    are the modules' own, except the fused q/k/v and reshaped/transposed ones (new tensors).
    """
    state = {**_unet_to_ldm(components["unet"]), **_vae_to_ldm(components["vae"])}
    for name, prefix, naming in TEXT_ENCODER_PREFIXES[family]:
        state.update(_text_to_ldm(components[name], prefix, naming))
    return state
