"""LoRA names of the flow families (SD 3 / 3.5, FLUX.1): what the studio writes, and how it loads them.

A studio LoRA of an SD 3 or FLUX transformer is a kohya-style file (``lora_down.weight`` /
``lora_up.weight`` / ``alpha`` per module) whose transformer modules carry **diffusers' module paths**
under the ``lora_transformer_`` prefix (dots → ``_``) — the naming OneTrainer writes, which ComfyUI
reads for both families (``comfy/lora.py``: "OneTrainer lora") and diffusers' FLUX loader reads
(its kohya "mixture" branch). Text encoders keep kohya's CLIP prefixes:

==========================  ===================================  ===================================
family                      transformer                          text encoders (CLIP only; T5 never)
==========================  ===================================  ===================================
``sd3``                     ``lora_transformer_transformer_      ``lora_te1_`` CLIP-L, ``lora_te2_``
                            blocks_0_attn_to_q``                 CLIP-G
``flux``                    ``lora_transformer_single_           ``lora_te1_`` CLIP-L
                            transformer_blocks_0_attn_to_q``
==========================  ===================================  ===================================

diffusers' SD 3 loader reads no kohya names, so the studio applies these files — on both families —
through diffusers' PEFT names (``transformer.<path>.lora_A.weight``, ``text_encoder[_2].…``) with
the scale ``α / r`` folded into ``B`` (:func:`studio.methods.lora.keys.flow_peft_state`); ``studio export --format diffusers``
writes the same names to a file. For FLUX, ``--format kohya`` / ``--format bfl`` write BFL's layout (q/k/v fused;
:mod:`studio.methods.lora.flux_formats`), and all three are read back on import.

Default targets (diffusers' DreamBooth-LoRA examples): SD 3 — ``attn.{to_q,to_k,to_v,to_out.0,add_q_proj,
add_k_proj,add_v_proj,to_add_out}`` of every joint block; FLUX — those plus the feed-forwards
``ff.net.0.proj``, ``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``; in the single-stream
blocks these suffixes match ``attn.to_q/k/v`` only (their ``proj_mlp`` / ``proj_out`` stay frozen unless
named in ``--target-modules``).
"""

from __future__ import annotations

from typing import Any

FLOW_PREFIX = "lora_transformer_"
FLOW_TE_PREFIXES = ("lora_te1_", "lora_te2_")  # CLIP-L, CLIP-G (SD 3); FLUX uses the first only
SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out"]
FLUX_TARGETS = SD3_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

# Module-name parts with "_" in diffusers' SD 3 / FLUX transformers and CLIP (longest first), to turn a
# flattened name back into a module path.
_COMPOUNDS = tuple(sorted((
    "single_transformer_blocks", "transformer_blocks", "time_text_embed", "timestep_embedder", "guidance_embedder",
    "text_embedder", "context_embedder", "x_embedder", "pos_embed", "norm_out", "proj_out", "proj_mlp",
    "ff_context", "norm1_context", "to_add_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_q", "to_k", "to_v",
    "to_out", "norm_q", "norm_k", "norm_added_q", "norm_added_k", "linear_1", "linear_2", "text_model",
    "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "final_layer_norm",
    "token_embedding", "position_embedding", "text_projection",
), key=len, reverse=True))


def is_flow_pipe(pipe: Any) -> bool:
    """True for an SD 3 / FLUX pipeline (a transformer, no UNet)."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def flow_module_path(flat: str) -> str:
    """``single_transformer_blocks_0_attn_to_q`` → ``single_transformer_blocks.0.attn.to_q``."""
    dotted = flat.replace("_", ".")
    for part in _COMPOUNDS:
        dotted = dotted.replace(part.replace("_", "."), part)
    return dotted


def default_targets(family: str) -> list[str]:
    """diffusers' example's transformer targets for ``family`` (sd3 / flux; module docstring)."""
    return list(FLUX_TARGETS if family == "flux" else SD3_TARGETS)


def flow_te_prefixes(n_encoders: int) -> tuple[str, ...]:
    """kohya prefixes of a flow base's CLIP encoders: ``lora_te1_`` (CLIP-L) [, ``lora_te2_`` (CLIP-G)]."""
    return FLOW_TE_PREFIXES[:n_encoders]


def flow_family_of(names: list[str]) -> str:
    """``flux`` when a LoRA's names address single-stream blocks, ``sd3`` when they address SD 3.5's
    second attention (``attn2``) or a joint block's context-free layout cannot tell; '' otherwise."""
    flat = [n for n in names if n.startswith(FLOW_PREFIX)]
    if any(n.startswith(FLOW_PREFIX + "single_transformer_blocks_") for n in flat):
        return "flux"
    if any("_attn2_" in n for n in flat):
        return "sd3"
    return ""
