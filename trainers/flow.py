"""The flow-matching objective of the SD 3 / 3.5 and FLUX.1 families (docs/methods.md, "SD 3 and FLUX").

Rectified flow (Liu et al. 2023; Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 1–3):
clean latents ``x₀``, noise ``ε`` and a noise level ``σ ∈ (0, 1)`` give

* ``x_σ = (1 − σ) · x₀ + σ · ε``  (the straight path; Esser et al. eq. 2 with ``a_t = 1 − t, b_t = t``),
* the transformer predicts the velocity ``v̂ = f(x_σ, σ, text)``; the target is ``v = ε − x₀``,
* ``L = w(σ) · ‖v̂ − v‖²`` averaged over the latent (masked by the photo's mask when it has one).

**σ.** The loop draws one integer ``t ∈ [0, 1000)`` per sample, uniformly (the same draw the UNet
families use); :func:`sigmas_from_draw` turns it into ``u = (t + ½) / 1000`` and then ``σ`` by the
inverse CDF of the chosen density, so the draw order — and resuming, and multi-process slicing —
stays the loop's:

* ``logit_normal`` (default on both families; Esser et al. §3.1, "lognorm(m, s)", their best):
  ``σ = sigmoid(m + s · Φ⁻¹(u))``;
* ``mode`` (Esser et al. eq. 20, "mode(s)"): ``σ = 1 − u − s · (cos²(π u / 2) − 1 + u)``;
* ``uniform``: ``σ = u`` (diffusers' FLUX example's default, ``--weighting_scheme none``).

diffusers' examples draw ``u`` from the same densities and look ``σ`` up in the scheduler's table at
``⌊u · 1000⌋``; that table is in descending order, so their σ is ``1 − u`` — the same distribution
for the symmetric logit-normal (``m = 0``) and for uniform. Here ``m > 0`` means *more* noise, as in
the paper.

**Shift.** ``σ′ = s·σ / (1 + (s − 1)·σ)`` (Esser et al. eq. 23, the resolution shift). ``flow_shift``
``None`` does what diffusers' DreamBooth-LoRA examples do: SD 3 uses its scheduler's static shift
(3.0 for every SD 3 / 3.5 release: their stored training σ are shifted), FLUX.1 none — its scheduler
shifts dynamically at inference only, and the example trains on the unshifted σ (kohya's
``flux_shift`` trains shifted instead: pass ``--flow-shift 3.16`` for a 1024² image's shift).

**Weighting** ``w(σ)``: ``none`` (1), ``sigma_sqrt`` (σ⁻²), ``cosmap`` (2 / (π(1 − 2σ + 2σ²))) —
diffusers' ``compute_loss_weighting_for_sd3`` — and ``precondition`` (σ²: the loss of the
preconditioned ``x̂₀ = x_σ − σ·v̂`` against ``x₀``, since ``x̂₀ − x₀ = −σ(v̂ − v)``; diffusers' SD 3
example's default ``--precondition_outputs 1``). ``auto``: ``precondition`` on SD 3, ``none`` on FLUX,
each as diffusers' example for that family.

**Inputs per family.** SD 3: ``transformer(x_σ, prompt_embeds, pooled, timestep = 1000σ)``. FLUX:
latents packed into 2×2 patches (``(B, C, h, w) → (B, h/2 · w/2, 4C)``), image ids ``(h/2 · w/2, 3)``
= (0, row, col), text ids zeros ``(L, 3)``, ``timestep = σ`` (the transformer scales by 1000 itself)
and, on FLUX.1-dev, the guidance embedding's input ``flow_guidance`` (1.0 by default: what diffusers'
README examples and kohya's FLUX docs train with; the script default is 3.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from studio.configs import option
from studio.errors import TrainingError
from trainers.conditioning import Conditioning, encode_flow_prompts  # noqa: F401 (re-exported)

DENSITIES = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("auto", "none", "sigma_sqrt", "cosmap", "precondition")


@dataclass
class FlowOptions:
    """Settings of the flow-matching objective (SD 3 / FLUX bases only; the UNet families ignore them)."""

    flow_density: str = option("logit_normal", "SD 3 / FLUX: how the noise level σ is drawn: logit_normal (Esser et "
                               "al.'s best), mode, or uniform (diffusers' FLUX example)", choices=list(DENSITIES),
                               group="flow")
    flow_logit_mean: float = option(0.0, "SD 3 / FLUX: m of the logit-normal density (> 0 = more noise)", group="flow")
    flow_logit_std: float = option(1.0, "SD 3 / FLUX: s of the logit-normal density", group="flow")
    flow_mode_scale: float = option(1.29, "SD 3 / FLUX: s of the mode density", group="flow")
    flow_shift: float | None = option(None, "SD 3 / FLUX: shift σ toward noise by this factor (default: as "
                                      "diffusers' examples: SD 3 the scheduler's 3.0, FLUX none)", group="flow")
    flow_weighting: str = option("auto", "SD 3 / FLUX: loss weight w(σ): auto (SD 3 precondition = σ², FLUX none, "
                                 "as diffusers' examples), none, sigma_sqrt, cosmap, precondition",
                                 choices=list(WEIGHTINGS), group="flow")
    flow_guidance: float = option(1.0, "FLUX.1-dev: the guidance embedding's input while training (1.0 as "
                                  "diffusers' and kohya's FLUX examples)", group="flow")


FLOW_DEFAULTS = {f.name: f.default for f in fields(FlowOptions)}  # name → default of every flow option


def check_flow_options(cfg: Any) -> None:
    """Refuse settings the flow objective cannot use (one sentence each)."""
    if getattr(cfg, "snr_gamma", 0) > 0:
        raise TrainingError("--snr-gamma (Min-SNR) weights ε/v losses by the UNet schedule's SNR; SD 3 / FLUX bases "
                            "train a flow objective: use --flow-weighting instead and leave --snr-gamma at 0.")
    if getattr(cfg, "flow_logit_std", 1.0) <= 0:
        raise TrainingError(f"flow_logit_std must be > 0, got {cfg.flow_logit_std}.")
    shift = getattr(cfg, "flow_shift", None)
    if shift is not None and not (shift > 0 and math.isfinite(shift)):
        raise TrainingError(f"flow_shift must be a positive number, got {shift}.")


def sigmas_from_draw(draw: torch.Tensor, n_levels: int, *, density: str = "logit_normal", logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0) -> torch.Tensor:
    """σ (B,) float32 in (0, 1) from uniform integer draws ``draw`` (B,) in ``[0, n_levels)`` (see the module
    docstring: inverse CDF of ``density``, then the shift of Esser et al. eq. 23)."""
    u = (draw.double() + 0.5) / n_levels
    if density == "logit_normal":
        normal = math.sqrt(2.0) * torch.erfinv(2 * u - 1)  # Φ⁻¹(u)
        sigma = torch.sigmoid(logit_mean + logit_std * normal)
    elif density == "mode":
        sigma = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif density == "uniform":
        sigma = u
    else:
        raise TrainingError(f"Unknown flow density {density!r}; use one of {', '.join(DENSITIES)}.")
    sigma = sigma.clamp(1e-4, 1 - 1e-4)
    if shift != 1.0:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma.float()


def loss_weights(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(σ) (B,) of ``weighting`` (none / sigma_sqrt / cosmap / precondition; module docstring)."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    if weighting == "precondition":
        return sigma ** 2
    raise TrainingError(f"Unknown flow weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}.")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2×2 patch tokens: (B, C, h, w) → (B, h/2 · w/2, 4C), row-major over patches, each token
    ``[c, dy, dx]`` in that order (the layout of ``FluxPipeline``'s packing)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: (B, h/2 · w/2, 4C) → (B, C, h, w)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's image-token positions (h/2 · w/2, 3): ``(0, row, col)`` of each 2×2 patch of an (h, w) latent."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(device=device, dtype=dtype)


@dataclass
class FlowFit:
    """The flow-matching loss of one transformer call (the flow counterpart of ``trainers.loop._Fit``).

    ``family`` sd3 / flux; ``guidance`` the FLUX-dev guidance input (None: the transformer has no
    guidance embedder); the σ settings as in :func:`sigmas_from_draw`."""

    transformer: Any
    family: str
    precision: Any
    n_levels: int = 1000
    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    weighting: str = "none"
    guidance: float | None = None

    @classmethod
    def for_base(cls, base: Any, cfg: Any, precision: Any) -> FlowFit:
        """The objective for ``base`` (sd3 / flux) with ``cfg``'s :class:`FlowOptions` (defaults when absent)."""
        check_flow_options(cfg)
        pipe, family = base.pipe, base.family
        shift = getattr(cfg, "flow_shift", None)
        if shift is None:  # diffusers' examples: SD 3's static shift; FLUX trains unshifted (dynamic at inference)
            sc = pipe.scheduler.config
            shift = 1.0 if family == "flux" or sc.get("use_dynamic_shifting") else float(sc.get("shift", 1.0))
        weighting = getattr(cfg, "flow_weighting", "auto")
        if weighting == "auto":
            weighting = "precondition" if family == "sd3" else "none"
        guidance = float(getattr(cfg, "flow_guidance", 1.0)) \
            if family == "flux" and pipe.transformer.config.get("guidance_embeds") else None
        return cls(transformer=pipe.transformer, family=family, precision=precision,
                   density=getattr(cfg, "flow_density", "logit_normal"), logit_mean=getattr(cfg, "flow_logit_mean", 0.0),
                   logit_std=getattr(cfg, "flow_logit_std", 1.0), mode_scale=getattr(cfg, "flow_mode_scale", 1.29),
                   shift=float(shift), weighting=weighting, guidance=guidance)

    def sigmas(self, draw: torch.Tensor) -> torch.Tensor:
        return sigmas_from_draw(draw, self.n_levels, density=self.density, logit_mean=self.logit_mean,
                                logit_std=self.logit_std, mode_scale=self.mode_scale, shift=self.shift)

    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v̂ (B, C, h, w) of the transformer for ``noisy`` (B, C, h, w) at noise levels ``sigma`` (B,)."""
        net = self.transformer
        pooled = (cond.added_cond_kwargs or {})["pooled_projections"]
        dtype = net.dtype
        if self.family == "flux":
            _, _, h, w = noisy.shape
            text = cond.encoder_hidden_states
            guidance = None if self.guidance is None else torch.full((len(noisy),), self.guidance, device=noisy.device)
            out = net(hidden_states=pack_latents(noisy).to(dtype), encoder_hidden_states=text.to(dtype),
                      pooled_projections=pooled.to(dtype), timestep=sigma.to(dtype),
                      img_ids=image_ids(h, w, noisy.device, dtype),
                      txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
                      guidance=guidance, return_dict=False)[0]
            return unpack_latents(out, h, w)
        return net(hidden_states=noisy.to(dtype), encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
                   pooled_projections=pooled.to(dtype), timestep=(sigma * 1000).to(dtype), return_dict=False)[0]

    def per_sample(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss (B,) ``w(σ) · mean ‖v̂ − (ε − x₀)‖²`` of ``latents`` x₀ (B, C, h, w), ``noise`` ε,
        ``timesteps`` the loop's uniform integer draws (B,) (turned into σ here); the first ``len(mask)``
        rows weighted by ``mask`` (M, 1, h, w) when given (instance images; class images are unmasked)."""
        sigma = self.sigmas(timesteps.cpu()).to(latents.device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        target = noise - latents
        with self.precision.autocast():
            pred = self.predict(noisy, sigma, cond)
        err = (pred.float() - target.float()) ** 2
        if mask is None:
            per = err.mean(dim=(1, 2, 3))
        else:
            n = len(mask)
            head = (err[:n] * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1e-6)
            per = torch.cat([head, err[n:].mean(dim=(1, 2, 3))])
        return per * loss_weights(sigma, self.weighting)
