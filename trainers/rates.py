"""Learning rates in the units of the base: what a preset's rate means on a base nobody tuned it for.

A preset written for Stable Diffusion 1.5 says "lr 1e-4"; on a base of other widths the same number
moves the trained tensors by a different fraction of their size, and a first training there can fail
silently (docs/methods.md, "Measured defaults"). The studio states each default rate in units of the
trained tensor's natural scale on *this* base and converts it when training starts:

* **token vectors** (textual inversion, Perfusion's embedding): Adam moves each entry by about ``lr``
  per step, so the rate is ``lr_scale × s`` with ``s`` the RMS of the input-embedding entries of the
  initializer words (:func:`embedding_rms`; ≈ 0.014 on SD 1.5's CLIP-L, whose rows have norm ≈ 0.39).
* **weight matrices** (LoRA factors, full fine-tuning, Perfusion's value targets): for Adam the step
  that keeps a layer's output change of the same size whatever the width is ``∝ 1 / fan_in``
  (μP, Yang et al., "Tensor Programs V", 2022, Table 3 — Adam, hidden weights). The rate is
  ``lr_scale / w`` with ``w`` the mean fan-in of the model's attention projections
  (:func:`attention_fan_in`): 777 on SD 1.5's UNet, 768 on its text encoder, so ``lr_scale`` 0.078 is
  the usual 1e-4 there.

``--lr`` always stays the optimizer's value as given; the effective rates are printed and stored in
the concept's ``studio.train`` (``lr_effective``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

SD15_UNET_FAN_IN = 777.0
"""Mean fan-in of SD 1.5's UNet attention projections: 16 transformer blocks (5 of width 320, 5 of
640, 6 of 1280: mean 780), each with 6 projections reading the block's width and 2 (cross-attention
``to_k``/``to_v``) reading the 768-d text: (6 · 780 + 2 · 768) / 8 = 777."""
SD15_TEXT_FAN_IN = 768.0
"""Fan-in of every attention projection of SD 1.5's text encoder (CLIP ViT-L/14's, 768 wide)."""


def attention_fan_in(model: nn.Module, suffixes: Iterable[str]) -> float:
    """Mean ``in_features`` of the ``nn.Linear`` layers of ``model`` whose names end with one of
    ``suffixes`` (the model's own, untouched by adapters: PEFT wraps them as ``base_layer``)."""
    ends = tuple(suffixes)
    widths = []
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")
        if isinstance(module, nn.Linear) and name.endswith(ends) and ".lora_" not in name:
            widths.append(module.in_features)
    if not widths:
        raise ValueError(f"no linear layer ending with {', '.join(ends)} in {type(model).__name__}")
    return float(sum(widths) / len(widths))


def fan_in_rate(lr_scale: float, fan_in: float) -> float:
    """``lr_scale / fan_in``: the optimizer's rate for a weight matrix of that mean fan-in (see the module docstring)."""
    return lr_scale / fan_in


def embedding_rms(embedding: nn.Module, ids: list[int]) -> float:
    """RMS of the entries of input-embedding rows ``ids`` (the natural scale of a token vector)."""
    weight: Any = getattr(embedding, "weight", None)
    with torch.no_grad():
        if weight is not None and weight.dim() == 2:
            rows = weight[torch.tensor(ids, device=weight.device)].float()
        else:
            rows = embedding(torch.tensor(ids)).float()
    return float(rows.pow(2).mean().sqrt())
