"""Device and dtype selection (explicit, never global)."""

from __future__ import annotations

import torch

from studio.errors import StudioError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cuda", "cuda:1", "mps", "cpu") or the best available: CUDA, then MPS, then CPU."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise StudioError(f"--device {requested} was asked for but CUDA is not available; pass --device cpu.")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise StudioError(f"--device {requested} was asked for but Apple MPS is not available; pass --device cpu.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA and MPS (what SD checkpoints are published in), fp32 on CPU; or ``requested``."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested and requested != "auto":
        try:
            return _DTYPES[requested]
        except KeyError:
            raise StudioError(f"Unknown dtype {requested!r}; use one of fp32, fp16, bf16.") from None
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32
