"""Text conditioning for training, the way the diffusers pipelines build it at inference.

SD 1/2: ``encoder_hidden_states = TE(ids).last_hidden_state`` — (B, 77, D).
SDXL: the penultimate hidden states of both encoders concatenated — (B, 77, D1 + D2) — plus the
second encoder's projected pooled output (B, P) and the micro-conditioning ``time_ids`` (B, 6):
``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per row, in the order of diffusers'
``StableDiffusionXLPipeline._get_add_time_ids`` (``original_size + crops_coords_top_left +
target_size``, each (h, w)). :func:`encode_prompts` fills the square ``[R, R, 0, 0, R, R]``; with
aspect-ratio buckets the loop puts each example's own values in (:func:`with_time_ids`, values from
:meth:`trainers.data.Example.time_ids`).

SD 3 / FLUX: the pipelines' own ``encode_prompt`` (:func:`encode_flow_prompts`):
``encoder_hidden_states`` (B, L, D) and ``added_cond_kwargs = {"pooled_projections": (B, P)}``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from studio.methods.runtime import text_encoders


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor  # (B, 77, D)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6)


def tokenize(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(B, 77) long ids, padded to the tokenizer's max length and truncated."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


class TokenCache:
    """Token ids of prompts, each prompt tokenized once per tokenizer state: a training run draws its
    prompts from a few templates × captions, and tokenizing them again every step is Python work that a
    small base notices. Rows are tokenized alone (padded to the tokenizer's max length), so a batch is the
    same ``(B, 77)`` ids :func:`tokenize` gives. Keyed by tokenizer and its length, so tokens added or
    removed meanwhile never serve stale ids."""

    def __init__(self) -> None:
        self._rows: dict[tuple[int, int, str, torch.device], torch.Tensor] = {}

    def __call__(self, tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(B, 77) long ids of ``prompts`` on ``device``."""
        rows = []
        for prompt in prompts:
            key = (id(tokenizer), len(tokenizer), prompt, torch.device(device))
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = tokenize(tokenizer, [prompt], device)[0]
            rows.append(row)
        return torch.stack(rows)


def encode_prompts(pipe: Any, prompts: list[str], *, resolution: int, device: torch.device,
                   ids: TokenCache | None = None) -> Conditioning:
    """The UNet's text conditioning of ``prompts`` (see the module docstring), through the encoders with
    gradients where they train. ``ids``: a run's :class:`TokenCache` (the same ids, tokenized once)."""
    if hasattr(pipe, "transformer") and getattr(pipe, "unet", None) is None:  # SD 3 / FLUX (trainers.flow)
        return encode_flow_prompts(pipe, prompts, device)
    token_ids = ids or tokenize
    pairs = text_encoders(pipe)
    if len(pairs) == 1:
        tok, te = pairs[0]
        return Conditioning(te(token_ids(tok, prompts, device))[0])
    hidden, pooled = [], None
    for tok, te in pairs:
        out = te(token_ids(tok, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output
    time_ids = square_time_ids(resolution, len(prompts), device=device, dtype=hidden[0].dtype)
    assert pooled is not None  # two encoders here
    return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})


def square_time_ids(resolution: int, n: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, 6) micro-conditioning of an uncropped ``resolution``² image: ``[R, R, 0, 0, R, R]`` per row."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                        dtype=dtype).repeat(n, 1)


def with_time_ids(cond: Conditioning, rows: list[tuple[int, int, int, int, int, int]]) -> Conditioning:
    """``cond`` with SDXL's ``time_ids`` replaced by ``rows`` (one ``(orig_h, orig_w, crop_top,
    crop_left, target_h, target_w)`` per prompt); unchanged for a base without micro-conditioning."""
    added = cond.added_cond_kwargs
    if added is None or "time_ids" not in added:
        return cond
    old = added["time_ids"]
    if old.shape != (len(rows), 6):
        raise ValueError(f"time_ids of shape {tuple(old.shape)} cannot take {len(rows)} rows")
    time_ids = torch.tensor(rows, device=old.device, dtype=old.dtype)
    return Conditioning(cond.encoder_hidden_states, added | {"time_ids": time_ids})


def max_sequence_length(pipe: Any) -> int:
    """The T5 length the pipeline's ``__call__`` uses by default (SD 3: 256, FLUX: 512), so that training
    reads the prompt exactly as generation does."""
    return int(inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default)


def encode_flow_prompts(pipe: Any, prompts: list[str], device: torch.device) -> Conditioning:
    """Text conditioning of SD 3 / FLUX as their pipelines build it (gradients flow through the CLIPs):
    ``encoder_hidden_states`` (B, L, D) — SD 3: both CLIPs' penultimate states (zero-padded to T5's width)
    followed by T5's; FLUX: T5's — and ``added_cond_kwargs = {"pooled_projections": (B, P)}`` — SD 3: both
    CLIPs' pooled projections; FLUX: CLIP-L's pooled output."""
    n = max_sequence_length(pipe)
    if type(pipe).__name__ == "FluxPipeline":
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, max_sequence_length=n)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=n)
    return Conditioning(embeds, {"pooled_projections": pooled})
