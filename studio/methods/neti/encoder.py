"""The CLIP text-encoder pass NeTI needs: arbitrary input vectors and a bypass before the final norm.

``text_encoder(ids)`` cannot take a different token vector per row at the placeholder position
plus a residual added *before* the final LayerNorm, so :func:`clip_hidden_states` re-runs the
encoder's own modules (embeddings → causal mask → layers) exactly as transformers does, from
``inputs_embeds``. With no bypass it reproduces ``text_encoder(ids)`` (tested for exactness).

Which states the UNet reads (``penultimate``):

* SD 1.x / 2.x: ``final_layer_norm(last layer)`` — the bypass is added before that norm, as in the
  reference code;
* SDXL: each encoder's ``hidden_states[-2]`` (the penultimate layer, no final norm) — the bypass is
  added to those states directly.

**Textual bypass** (NeTI §4.2): ``h' = h + s · (b/‖b‖) · ‖h‖`` at the concept's positions only
(``s = 0.2``); keys read the states without it, values with it.
"""

from __future__ import annotations

from typing import Any

import torch


def clip_core(text_encoder: Any) -> Any:
    """The module holding ``embeddings``, ``encoder`` and ``final_layer_norm``: the encoder itself
    (transformers 5 ``CLIPTextModel``) or its ``text_model`` (``CLIPTextModelWithProjection``)."""
    core = text_encoder
    for _ in range(3):
        if all(hasattr(core, a) for a in ("embeddings", "encoder", "final_layer_norm")):
            return core
        core = getattr(core, "text_model", None)
        if core is None:
            break
    raise TypeError(f"{type(text_encoder).__name__} is not a CLIP text encoder this studio can run for NeTI.")


def clip_hidden_states(text_encoder: Any, inputs_embeds: torch.Tensor, n_layers: int | None = None) -> list[torch.Tensor]:
    """Run the encoder from token vectors ``inputs_embeds`` (N, T, D) (position embeddings are added
    here). Returns ``[embeddings, after layer 1, …, after layer n_layers]``, each (N, T, D), none
    final-normed — like ``text_encoder(..., output_hidden_states=True).hidden_states``."""
    from transformers.masking_utils import create_causal_mask

    core = clip_core(text_encoder)
    hidden = core.embeddings(inputs_embeds=inputs_embeds)
    mask = create_causal_mask(config=core.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    out = [hidden]
    for layer in list(core.encoder.layers)[:n_layers]:
        hidden = layer(hidden, mask, is_causal=True)
        out.append(hidden)
    return out


def n_encoder_layers(text_encoder: Any) -> int:
    return len(clip_core(text_encoder).encoder.layers)


def bypass_direction(bypass: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · b/‖b‖`` (…, D) — what :func:`add_bypass` adds per unit of ``‖h‖``."""
    return scale * bypass / bypass.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def add_bypass(hidden: torch.Tensor, direction: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``h + direction · ‖h‖`` where ``where`` (N, T) is true, ``h`` elsewhere (exactly).

    ``hidden``: (N, T, D); ``direction``: (N, T, D), ``scale · b/‖b‖`` (:func:`bypass_direction`)."""
    moved = hidden + direction.to(hidden.dtype) * hidden.norm(dim=-1, keepdim=True)
    return torch.where(where.unsqueeze(-1), moved, hidden)


def text_states(text_encoder: Any, inputs_embeds: torch.Tensor, *, penultimate: bool,
                bypass: torch.Tensor | None = None, where: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The states the UNet reads, ``(for keys, for values)``, each (N, T, D).

    ``inputs_embeds`` (N, T, D): token vectors (placeholders already replaced). ``bypass`` (N, T, D):
    bypass directions ``scale · b/‖b‖`` applied where ``where`` (N, T) is true, before the final
    LayerNorm. Without them both outputs are the same tensor object."""
    n = n_encoder_layers(text_encoder)
    hidden = clip_hidden_states(text_encoder, inputs_embeds, n - 1 if penultimate else n)[-1]
    with_bypass = hidden if bypass is None or where is None else add_bypass(hidden, bypass, where)
    if penultimate:
        return hidden, with_bypass
    norm = clip_core(text_encoder).final_layer_norm
    keys = norm(hidden)
    return keys, (keys if with_bypass is hidden else norm(with_bypass))


def pooled_text_embeds(text_encoder: Any, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
    """SDXL's ``text_embeds`` (N, P): the final-normed state at the end-of-text token, projected —
    what ``CLIPTextModelWithProjection`` returns, from ``last_hidden`` (N, T, D) (not normed)."""
    core = clip_core(text_encoder)
    normed = core.final_layer_norm(last_hidden)
    ids = input_ids.to(device=normed.device, dtype=torch.int)
    eos = ids.argmax(dim=-1) if core.eos_token_id == 2 else (ids == core.eos_token_id).int().argmax(dim=-1)
    pooled = normed[torch.arange(normed.shape[0], device=normed.device), eos]
    projection = getattr(text_encoder, "text_projection", None)
    return projection(pooled) if projection is not None else pooled
