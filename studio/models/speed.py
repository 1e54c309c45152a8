"""Speed switches of a loaded base, for one training run or one generation call (README "Fast paths").

Each is a context manager that changes the pipeline's modules in place and puts them back exactly
on exit, so the base is the plain base between calls (docs/architecture.md, "Methods"):

* :func:`unet_speedups` — ``channels_last``: the UNet's 4-d weights (convolutions) in channels-last
  memory layout, which cuDNN's fastest kernels on recent GPUs want (the values are untouched, only
  the strides change, and they change back); ``compile``: ``torch.compile`` of the UNet's forward
  (``nn.Module.compile``, in place, so hooks and processors on the UNet stay where they are).
  Compiled code is cached by PyTorch per process, so a second call compiles again only when
  shapes or hooks differ;
* :func:`vae_tiling` — decode (and encode) large images tile by tile (diffusers' ``enable_tiling``):
  memory grows with the tile, not with the image; tiles are blended, so the result differs
  slightly from an untiled decode.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from studio.errors import StudioError


def compile_unsupported(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot run here (one sentence), or ``None`` when it can."""
    dev = torch.device(device)
    try:
        import torch._dynamo as dynamo
    except ImportError:  # a PyTorch build without dynamo
        return "this PyTorch build has no torch.compile"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version or platform"
    if dev.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if not compiler or not shutil.which(compiler):
            return "torch.compile on a CPU needs a C++ compiler (g++ or clang++) on the PATH"
    if dev.type == "mps":
        return "torch.compile of a UNet is not supported on Apple MPS yet"
    return None


@contextlib.contextmanager
def unet_speedups(unet: Any, *, channels_last: bool = False, compile: bool = False) -> Iterator[None]:
    """The UNet in channels-last layout and/or compiled inside the block; exactly as before after it.

    Raises :class:`StudioError` before changing anything when ``compile`` cannot run on this machine."""
    if compile:
        why = compile_unsupported(next(unet.parameters()).device)
        if why:
            raise StudioError(f"--compile cannot run here: {why}; leave --compile off.")
    converted: list[torch.nn.Parameter] = []
    had_compiled = getattr(unet, "_compiled_call_impl", None)
    try:
        if channels_last:
            with torch.no_grad():
                for p in unet.parameters():
                    if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                        p.data = p.data.contiguous(memory_format=torch.channels_last)
                        converted.append(p)
        if compile and had_compiled is None:
            unet.compile()
        yield
    finally:
        if compile and had_compiled is None:
            unet._compiled_call_impl = None  # nn.Module.compile's own slot: the eager forward again
        with torch.no_grad():
            for p in converted:
                p.data = p.data.contiguous()


@contextlib.contextmanager
def vae_tiling(vae: Any, on: bool) -> Iterator[None]:
    """The VAE decodes tile by tile inside the block when ``on``; its own setting afterwards."""
    if not on:
        yield
        return
    before = bool(getattr(vae, "use_tiling", False))
    vae.enable_tiling()
    try:
        yield
    finally:
        if not before:
            vae.disable_tiling()
