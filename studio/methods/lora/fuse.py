"""Fused LoRA: the update folded into the base weights for a generation whose strength is fixed.

An unfused LoRA (a PEFT adapter) computes ``W x + s · (α/r) · B (A x)`` at every layer call: two
extra small matrix products and a Python wrapper per adapted layer, every sampling step. Folding
the update into the weight once, ``W′ = W + s · (α/r) · B A`` (Hu et al. 2021, eq. 3 with kohya's
α), makes the layer a plain ``Linear`` / ``Conv2d`` again; sampling then costs what the base costs.

**Exact removal.** Subtracting the update again is not exact in float16/bfloat16 (``W + Δ − Δ``
rounds twice), so the weight each fused LoRA touches is first **copied** to the host, and removing
restores that copy bit for bit. With several fused LoRAs on one weight, the weight is always
``round(W₀ + Σᵢ Δᵢ)`` of the concepts still fused (summed in float32, rounded once), and the
original comes back when the last one leaves — in any order of removal.

The factors are read from the PEFT layers that diffusers' ``load_lora_weights`` built, with the
scale ``s · α/r`` diffusers' ``set_adapters`` gave them, so a fused LoRA is the same function as
the unfused one: one reading of kohya files (:mod:`studio.methods.lora.keys`) for both paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn


@dataclass
class Factor:
    """One adapted layer of one LoRA: ``weight`` (the base layer's own parameter, (out, in) or
    (out, in, kh, kw)), ``down`` A (r, in[, kh, kw]) and ``up`` B (out, r[, 1, 1]) in float32 on the
    weight's device, and ``scale`` = strength · α/r."""

    weight: nn.Parameter
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """``scale · B A`` in float32, shaped like :attr:`weight`: ``(out, in)``; for a convolution
        ``(out, in, kh, kw)``: A's kernel mixed by B's 1×1 kernel, ``Σ_r B[o, r] A[r, i]``."""
        if self.down.dim() == 2:
            return self.scale * (self.up @ self.down)
        return self.scale * torch.einsum("or,rihw->oihw", self.up.flatten(1), self.down)


def peft_factors(models: list[nn.Module], adapter: str) -> list[Factor] | None:
    """The :class:`Factor` of every PEFT LoRA layer of ``adapter`` in ``models`` (UNet, text encoders),
    or ``None`` when one cannot be fused exactly (a DoRA or bias LoRA, a layer that is not a Linear
    or Conv2d, weights on the meta device under sequential offload): the caller keeps it unfused."""
    from peft.tuners.lora import LoraLayer

    out = []
    for model in models:
        for found in model.modules():
            if not isinstance(found, LoraLayer) or adapter not in getattr(found, "lora_A", {}):
                continue
            module: Any = found  # PEFT's layers keep their sub-layers in ModuleDicts by adapter name
            base = module.get_base_layer()
            if (not isinstance(base, (nn.Linear, nn.Conv2d)) or base.weight.device.type == "meta"
                    or module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter)
                    or getattr(module, "fan_in_fan_out", False)):
                return None
            if isinstance(base, nn.Conv2d) and (base.groups != 1 or module.lora_B[adapter].weight.shape[-2:] != (1, 1)):
                return None
            dev = base.weight.device
            out.append(Factor(weight=cast(nn.Parameter, base.weight),
                              down=module.lora_A[adapter].weight.detach().to(dev, torch.float32, copy=True),
                              up=module.lora_B[adapter].weight.detach().to(dev, torch.float32, copy=True),
                              scale=float(module.scaling[adapter])))
    return out


@dataclass
class FusedWeights:
    """The fused LoRAs of one pipeline: each adapter's factors, and a host copy of every weight any
    of them touches (taken before the first one touched it)."""

    adapters: dict[str, list[Factor]] = field(default_factory=dict)
    originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def add(self, adapter: str, factors: list[Factor]) -> None:
        """Fold ``adapter``'s factors into their weights (transactional: on failure nothing stays folded)."""
        self.adapters[adapter] = factors
        try:
            self._rebake(factors)
        except BaseException:
            self.drop(adapter)
            raise

    def drop(self, adapter: str) -> None:
        """Unfold ``adapter``: its weights become the originals plus the remaining adapters' updates
        (the originals, bit for bit, when none remains)."""
        factors = self.adapters.pop(adapter, None)
        if factors:
            self._rebake(factors)

    def _rebake(self, touched: list[Factor]) -> None:
        with torch.no_grad():
            for key in dict.fromkeys(id(f.weight) for f in touched):
                weight = next(f.weight for f in touched if id(f.weight) == key)
                if key not in self.originals:
                    self.originals[key] = (weight, weight.detach().to("cpu", copy=True))
                original = self.originals[key][1]
                parts = [f for fs in self.adapters.values() for f in fs if id(f.weight) == key]
                if not parts:
                    weight.copy_(original)
                    del self.originals[key]
                    continue
                total = original.to(weight.device, torch.float32, copy=True)  # never the saved copy itself
                for f in parts:
                    total += f.delta()
                weight.copy_(total.to(weight.dtype))


def fused_models(pipe: Any) -> list[nn.Module]:
    """The modules a LoRA adapts: the UNet (SD 3 / FLUX: the transformer) and the text encoder(s)."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    return [m for m in (denoiser, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if m is not None]
