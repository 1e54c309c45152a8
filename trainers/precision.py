"""Mixed precision for the shared training loop (docs/architecture.md, "Training"; README "Fast paths").

The recipe every trainer follows:

* **frozen weights in the low precision** — the base's weights are whatever ``--dtype`` loaded
  (fp16 on CUDA by default, ``--dtype bf16`` for bf16); they are never trained, so their precision
  only costs accuracy of the forward, not of the update;
* **trained tensors in float32** — each trainer creates its tensors in float32 (LoRA factors,
  token vectors, value targets, mappers, adapter weights); the loop checks it before step 1, so
  the optimizer always holds float32 master values and float32 moments;
* **autocast for the forward** (``torch.autocast`` with ``--mixed-precision``'s dtype): matrix
  products run in fp16/bf16 whatever the weights' dtype, the loss is computed in float32;
* **loss scaling for fp16** on a GPU (``torch.amp.GradScaler``): the loss is multiplied before
  ``backward`` so small fp16 activation gradients do not underflow, the gradients are unscaled
  before clipping, and a step whose gradients overflowed is skipped (the scale then shrinks).

The loop used accelerate's autocast before; accelerate keeps its mixed-precision mode in a
process-wide singleton, so a second run with another ``--mixed-precision`` in the same process
(the job worker, the app, a test session) failed, and on a CPU it turned ``fp16`` silently into
float32. This module keeps the mode per run instead.

fp16 on a CPU is refused: CPU autocast has no fp16 kernels for many operations and no loss
scaling; bf16 is the CPU's low precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from studio.errors import TrainingError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Precision:
    """One run's mixed-precision mode: the autocast dtype (``None``: off) on ``device_type``, and the
    fp16 loss scaler (``None``: no scaling)."""

    mode: str
    device_type: str
    dtype: torch.dtype | None
    scaler: Any = None  # torch.amp.GradScaler

    @classmethod
    def for_run(cls, mode: str, device: torch.device) -> Precision:
        """The mode ``mode`` (``no`` / ``fp16`` / ``bf16``) on ``device``; refuses what the device cannot run."""
        if mode == "no":
            return cls(mode, device.type, None)
        if mode not in AUTOCAST_DTYPES:
            raise TrainingError(f"Unknown --mixed-precision {mode!r}; use no, fp16 or bf16.")
        if mode == "fp16" and device.type == "cpu":
            raise TrainingError("--mixed-precision fp16 needs a GPU (CUDA or MPS): CPU autocast lacks fp16 kernels "
                                "for many operations and has no loss scaling; use --mixed-precision bf16 on a CPU, "
                                "or no.")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError(f"--mixed-precision bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                                f"{torch.cuda.get_device_name(device)} has none: use --mixed-precision fp16.")
        scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        return cls(mode, device.type, AUTOCAST_DTYPES[mode], scaler)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's autocast region (a no-op context when mixed precision is off)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the loss scaled first under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: Any) -> None:
        """Divide the accumulated gradients by the loss scale (before clipping or inspecting them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: Any) -> bool:
        """The optimizer step; under fp16 skipped when a gradient overflowed (the scale shrinks).
        Returns whether the step was taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale shrinks exactly when the step was skipped

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed fp16 run scales as the uninterrupted one (JSON-able)."""
        if self.scaler is None:
            return {}
        return {"scaler": {k: (float(v) if isinstance(v, float) else int(v))
                           for k, v in self.scaler.state_dict().items()}}

    def load_state(self, saved: dict[str, Any] | None) -> None:
        if self.scaler is not None and saved and isinstance(saved.get("scaler"), dict):
            self.scaler.load_state_dict(saved["scaler"])


def check_trainable(trainable: dict[str, torch.Tensor], precision: Precision) -> None:
    """Every tensor that receives gradients is float32 (the master copy the optimizer updates): a
    low-precision trained tensor would lose small updates to rounding (an fp16 weight of 1.0 cannot
    take a step below 5e-4)."""
    low = sorted(k for k, t in trainable.items() if t.requires_grad and t.dtype != torch.float32)
    if low:
        raise TrainingError(f"The trained tensors {', '.join(low[:3])}{' …' if len(low) > 3 else ''} are "
                            f"{trainable[low[0]].dtype}, not float32; mixed precision keeps trained tensors in "
                            "float32 (a method bug: create them with dtype=torch.float32).")


def frozen_dtypes(pipe: Any) -> set[torch.dtype]:
    """The floating dtypes of the UNet's and the text encoders' weights."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer  # SD 3 / FLUX
    mods = [denoiser, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    return {p.dtype for m in mods if m is not None for p in m.parameters() if p.is_floating_point()}


def precision_note(pipe: Any, precision: Precision) -> str | None:
    """One line when the base's weights and the autocast dtype do not match (a memory or speed hint),
    else ``None``."""
    have = frozen_dtypes(pipe)
    if precision.dtype is None:
        if precision.device_type == "cuda" and torch.float16 in have:
            return ("note: the base's weights are float16 and --mixed-precision is no: fp16 activations get no "
                    "loss scaling; --mixed-precision fp16 adds it")
        return None
    if have == {precision.dtype}:
        return None
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in have))
    return (f"note: the base's weights are {names} while autocast runs {precision.mode}: "
            f"load the base with --dtype {precision.mode} to keep the frozen weights in {precision.mode} "
            "(less memory, no per-operation casts)")

