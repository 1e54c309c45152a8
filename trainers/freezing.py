"""Freeze a pipeline for training and give it back as it was (every trainer trains a few tensors of
its own and none of the base's weights)."""

from __future__ import annotations

from typing import Any

from torch import nn

from studio.methods.runtime import text_encoders

Frozen = list[tuple[nn.Parameter, bool]]


def freeze_pipeline(pipe: Any) -> Frozen:
    """Turn off gradients of the UNet (SD 3 / FLUX: the transformer), the VAE and every text encoder (T5
    included); returns what to :func:`unfreeze`."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    t5 = [te for name in ("text_encoder_2", "text_encoder_3")
          if (te := getattr(pipe, name, None)) is not None and all(te is not c for _, c in text_encoders(pipe))]
    mods = [denoiser, pipe.vae] + [te for _, te in text_encoders(pipe)] + t5
    saved = [(p, p.requires_grad) for m in mods for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def unfreeze(saved: Frozen) -> None:
    """Restore the ``requires_grad`` flags :func:`freeze_pipeline` recorded."""
    for p, flag in saved:
        p.requires_grad_(flag)
