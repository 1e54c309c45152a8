"""The CLIP image encoder an IP-Adapter reads (docs/methods.md §6): loading, the processor, and the
check that an adapter and an encoder fit each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.methods.zeroshot.adapter import _HUB_REPO, AdapterInfo


@dataclass
class ImageEncoder:
    """A CLIP vision tower and its preprocessing (diffusers' default: resize + centre-crop to the
    encoder's ``image_size``, CLIP mean/std)."""

    model: Any  # transformers CLIPVisionModelWithProjection
    processor: Any
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: Sequence[Any], hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images → ``(embeds, negative)`` as diffusers' ``encode_image`` makes them.

        ``hidden_states=False``: ``image_embeds`` (N, D_e) and zeros (1, D_e);
        ``True``: ``hidden_states[-2]`` (N, T, D_h) and the same of a black (all-zero) input (1, T, D_h).
        float32 on the CPU.
        """
        dtype = next(self.model.parameters()).dtype
        pix = self.processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        pix = pix.to(self.device, dtype)
        if hidden_states:
            pos = self.model(pix, output_hidden_states=True).hidden_states[-2]
            neg = self.model(torch.zeros_like(pix[:1]), output_hidden_states=True).hidden_states[-2]
        else:
            pos = self.model(pix).image_embeds
            neg = torch.zeros_like(pos[:1])
        return pos.float().cpu(), neg.float().cpu()


def clip_processor(image_size: int) -> Any:
    """diffusers' default feature extractor for an encoder of ``image_size`` (PIL backend: no torchvision)."""
    Proc: Any  # one of two classes, by transformers version
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    return Proc(size=image_size, crop_size=image_size)


def load_image_encoder(source: str | None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       pipe: Any = None, what: str = "the adapter") -> ImageEncoder:
    """A CLIP image encoder from a local folder or ``owner/repo/subfolder`` on the hub (cached on
    ``pipe`` when given: one encoder, the last one used)."""
    if not source:
        raise StudioError(f"No CLIP image encoder found for {what}: pass --image-encoder FOLDER (a "
                          "CLIPVisionModelWithProjection folder, e.g. models/image_encoder of h94/IP-Adapter).")
    cached = getattr(pipe, "_studio_image_encoder", None) if pipe is not None else None
    if cached is not None and cached.source == source:
        return cached
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    local = Path(source).expanduser()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a CLI prints results, not "Loading weights" bars
    model: Any  # a CLIPVisionModelWithProjection (transformers' wrapped ``.to`` does not type-check as a method)
    try:
        if local.is_dir():
            model = CLIPVisionModelWithProjection.from_pretrained(str(local), dtype=dtype)
        else:
            parts = source.split("/")
            if len(parts) < 2 or not _HUB_REPO.match("/".join(parts[:2])):
                raise StudioError(f"Image encoder {source!r} is not a folder; pass a CLIPVisionModelWithProjection "
                                  "folder with --image-encoder.")
            model = CLIPVisionModelWithProjection.from_pretrained("/".join(parts[:2]), subfolder="/".join(parts[2:]),
                                                                  dtype=dtype)
    except StudioError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/IO failures: one actionable message
        raise StudioError(f"Could not load the image encoder {source} ({type(err).__name__}: {str(err)[:120]}); "
                          "pass a local folder with --image-encoder.") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device).eval().requires_grad_(False)
    encoder = ImageEncoder(model, clip_processor(int(model.config.image_size)), source)
    if pipe is not None:
        pipe._studio_image_encoder = encoder
    return encoder


def check_encoder(encoder: ImageEncoder, info: AdapterInfo, what: str) -> None:
    cfg = encoder.model.config
    have = int(cfg.hidden_size) if info.hidden_states else int(cfg.projection_dim)
    if have != info.embed_dim:
        kind = "hidden states" if info.hidden_states else "image embeddings"
        raise StudioError(f"{what} reads {info.embed_dim}-d {kind} but the image encoder {encoder.source} makes "
                          f"{have}-d ones; pass the encoder the adapter was trained with (--image-encoder).")
