"""Custom Diffusion training (Kumari et al., CVPR 2023, arXiv 2212.04488, §3.1; docs/methods.md,
"Custom Diffusion"): the cross-attention ``W_k``/``W_v`` of every UNet layer and a new modifier token's
input embedding learn, everything else is frozen.

Per step (the shared loop does data, noise, the masked loss, prior preservation and checkpoints):

1. the prompt ``"photo of a <new1> cat"`` (``--instance-prompt``; ``{}`` = token + class noun) is encoded
   with the token's trainable embedding spliced into the encoder (one Parameter per encoder: only that
   row trains — the paper zeroes the other rows' gradients; a separate row is the same update and
   never touches the vocabulary);
2. every cross-attention layer computes ``K = (W₀_k + ΔW_k) ctx`` and ``V = (W₀_v + ΔW_v) ctx`` through the
   same hook as inference (:class:`~studio.methods.custom_diffusion.CustomDiffusionHook`), with
   ``ΔW`` trainable Parameters that start at 0 (Adam's steps on ``ΔW`` are exactly its steps on ``W``);
3. ``L = ‖ε − ε̂‖²`` on the photos (masked by their masks when present) ``+ λ_prior · ‖ε − ε̂‖²`` on class
   images of ``"photo of a cat"`` (the paper's regularisation set, λ = 1): generated once by the base and
   cached per base as DreamBooth's (shared cache), or ``--class-images DIR`` — the paper retrieves ~200
   real LAION images with CLIP, which needs a service that no longer exists; a folder of real photos of
   the class is the closest.

**Learning rate** (the paper: 1e-5 per sample, scaled by the batch: diffusers' ``--scale_lr`` multiplies
it by batch × accumulation × GPUs, so batch 2 on one GPU trains at 2e-5; the CompVis config's 2 GPUs ×
batch 4 at 8e-5). Here the per-sample rate is stated in units of ``1/fan-in`` of the trained matrices
(μP for Adam, :mod:`trainers.rates`): ``--lr-scale`` 0.00768 is 1e-5 on SD 1.5, whose K/V read the
768-d text. With ``--scale-lr`` (on, as the paper) it is multiplied by batch × accumulation × processes.
The token trains at the same rate (the paper has one optimizer group for both) unless ``--token-lr``.
On the demo world (64-d text) the paper's rule gives 2.4e-4 at batch 2, which does not learn the
concept within a few hundred steps there; its ``demo-world`` preset is measured (README).

**Random-scale augmentation** (``--scale-augment``; on in the official code, whose data pipeline applies it to
every instance photo with no switch, but off by default here: with it the defaults did not learn on either
learnable base, docs/methods.md). Per instance sample the official code draws a side ``s``: with
probability 2/3 uniformly from ``[R/3, R]``, else from ``[1.2R, 1.4R)`` (``R`` the training resolution; odd
sides + 1). ``s < 0.6R``: the photo is shrunk to ``s`` and pasted at a uniform place on a canvas of zeros
(``[−1, 1]`` units: mid-gray), the loss is masked to latent rows ``⌊top/f⌋+1`` to ``⌊(top+s)/f⌋−1`` (end
excluded; columns alike, ``f`` the VAE's downsampling: the pasted square eroded by a latent pixel), and the
prompt gets "a far away " or "very small " in front. ``s > R``: the photo is enlarged to ``s``,
a uniform ``R × R`` window is cut, and the prompt gets "zoomed in " or "close up ". Otherwise (``0.6R ≤ s ≤ R``,
probability ``p_keep`` ≈ 0.40) the photo is used as it is.

The shared loop encodes every photo once and draws from that cache, so the plain photos (the "keep"
outcome) come from the loop, and this trainer adds the rescaled ones in :meth:`extra_loss`: each step it
draws ``batch_size`` more photos from the rescaled outcomes only (its own generator, seeded by seed, step
and micro-step so a resumed run draws the same), VAE-encodes them and adds their masked loss with weight
``(1 − p_keep)/p_keep``; the prior weight is divided by ``p_keep``. In expectation the total is then the
official objective ``p_keep·L_keep + (1 − p_keep)·L_rescaled + λ·L_prior`` times ``1/p_keep`` (a constant
that Adam's update does not see), with twice the instance samples per step (1.5× the UNet work with prior
preservation). Not with ``--buckets`` (the draw is defined on square crops).

**Not ported**: the ``--freeze_model crossattn`` variant (training ``to_q``/``to_out`` too, for faces).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.methods.attention import add_hook, remove_hook, store_of, unet_layers
from studio.methods.custom_diffusion import EMBEDDINGS, CustomDiffusion, CustomDiffusionHook, concept_tensors
from studio.methods.custom_diffusion.hook import base_weight
from studio.methods.runtime import SplicedEmbedding, text_encoders, token_table
from studio.models.profile import DEFAULT_GUIDANCE, DEFAULT_STEPS
from trainers.conditioning import Conditioning, encode_prompts
from trainers.data import Example
from trainers.entry import TrainerEntry
from trainers.freezing import freeze_pipeline, unfreeze
from trainers.loop import CommonTrainConfig, PriorSet, load_training_images
from trainers.lora import class_prior
from trainers.precision import Precision
from trainers.templates import TEMPLATES, fill_templates

SD15_KV_FAN_IN = 768.0  # SD 1.5's cross-attention K/V read the 768-d CLIP-L text


@dataclass
class CustomDiffusionConfig(CommonTrainConfig):
    steps: int = option(500, "optimizer steps (the paper: 250 on 2 GPUs = 500 on one)", group="training")
    batch_size: int = option(2, "images per step per process (the paper: 2)", group="training")
    lr: float | None = option(None, "learning rate given to the optimizer as is (default: --lr-scale / the K/V "
                              "fan-in, × the batch with --scale-lr: 2e-5 on SD 1.5 at batch 2)", group="training")
    lr_scale: float = option(0.00768, "per-sample learning rate in units of 1/fan-in of the trained K/V (0.00768 = "
                             "the paper's 1e-5 on SD 1.5); used without --lr", group="training")
    scale_lr: bool = option(True, "multiply the derived rate by batch × accumulation × processes, as the paper",
                            group="training")
    token_lr: float | None = option(None, "learning rate of the modifier token's embedding (default: the K/V rate, "
                                    "as the paper)", group="training")
    init_token: str = option("ktn", "the modifier token starts from this word's input embedding (the paper's rare "
                             "'ktn'; mean over its tokens)", group="concept")
    instance_prompt: str = option("photo of a {}", "instance prompt; {} = the modifier token + class word",
                                  group="concept")
    use_templates: bool = option(False, "vary the instance prompt with --templates instead", group="concept")
    prior_preservation: bool = option(True, "train on class images too (the paper's regularisation set)", group="prior")
    prior_weight: float = option(1.0, "λ_prior: weight of the class-image loss", group="prior")
    class_prompt: str | None = option(None, "class prompt (default: 'photo of a CLASS_WORD')", group="prior")
    num_class_images: int = option(200, "class images (the paper: 200 retrieved real images; here generated by the "
                                   "base and cached per base, or --class-images)", group="prior")
    class_images: str | None = option(None, "a folder of real class images instead of generated ones", group="prior",
                                      path="folder")
    class_cache_dir: str | None = option(None, "class-image cache (default: ~/.cache/studio/class_images)",
                                         group="prior")
    class_steps: int = option(DEFAULT_STEPS, "sampling steps per generated class image", group="prior")
    class_guidance: float = option(DEFAULT_GUIDANCE, "guidance scale of generated class images", group="prior")
    class_batch_size: int = option(4, "class images generated per pipeline call", group="prior")
    scale_augment: bool = option(False, "the paper's random-scale augmentation: photos also trained shrunk on a "
                                 "plain canvas (loss masked to them, 'a far away'/'very small' prompts) or zoomed in "
                                 "('zoomed in'/'close up'); on in the official code, off by default here: with it "
                                 "the defaults did not learn on either learnable base (fidelity 0.00 / 0.31 vs "
                                 "0.99 / 1.00 without)", group="data")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_augment and self.buckets:
            raise TrainingError("--scale-augment rescales square crops; train with --no-buckets, or turn the "
                                "augmentation off with --no-scale-augment.")
        if not self.class_word:
            raise TrainingError("Custom Diffusion puts a modifier before the class noun: pass --class-word (what "
                                "the subject is, e.g. dog).")
        if "{}" not in self.instance_prompt:
            raise TrainingError(f"--instance-prompt {self.instance_prompt!r} needs a {{}} where the token and class "
                                "word go, e.g. 'photo of a {}'.")
        rates = (self.lr_scale, self.token_lr)
        if any(r is not None and not (r >= 0 and math.isfinite(r)) for r in rates):
            raise TrainingError(f"lr_scale and token_lr must be ≥ 0, got {rates}.")
        if not self.init_token.strip():
            raise TrainingError("--init-token must name a word, e.g. ktn.")
        if self.prior_weight < 0 or self.num_class_images < 1 or self.class_steps < 1 or self.class_batch_size < 1:
            raise TrainingError("prior_weight must be ≥ 0 and num_class_images, class_steps, class_batch_size ≥ 1.")

    def derives_lr(self) -> bool:
        return True

    def token_candidates(self) -> list[str]:
        return [f"<new{i}>" for i in range(1, 100)]  # diffusers' and the paper's modifier names

    def class_text(self) -> str:
        return self.class_prompt or f"photo of a {self.class_word}"


PRESETS = {
    # The paper / diffusers README, single concept on one GPU: batch 2, 500 steps, 1e-5 × batch.
    "paper": dict(steps=500, batch_size=2, lr_scale=0.00768, scale_lr=True, num_class_images=200),
    # For --base demo (the learnable world: 32 px, a 64-wide text encoder), measured there (README). Without the
    # random-scale augmentation: the world draws two sizes only and its latents are 8 × 8, so a shrunk photo keeps
    # 0-9 latent pixels of loss and a zoomed one shows a circle larger than any the base knows; with it the
    # concept is not learned (fidelity 0.000 on seeds 0-2, 0.998-1.000 without).
    "demo-world": dict(steps=200, batch_size=4, lr=2e-3, token_lr=2e-2, scale_lr=False, num_class_images=48,
                       class_steps=20, class_guidance=4.0, prior_weight=1.0, scale_augment=False),
}


def init_embedding(tokenizer: Any, embedding: nn.Module, word: str) -> torch.Tensor:
    """``(1, D)``: the mean input embedding of ``word``'s tokens (no BOS/EOS)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise TrainingError(f"--init-token {word!r} has no tokens in this base's tokenizer; pass another word.")
    weight = next(iter(embedding.parameters()))
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=weight.device)).float().mean(0, keepdim=True).cpu()


# -- random-scale augmentation (the official data pipeline; module docstring) ----------------------------------
SHRINK_PREFIXES = ("a far away ", "very small ")
"""Prepended to the prompt of a photo shrunk below 0.6 × the resolution."""
ZOOM_PREFIXES = ("zoomed in ", "close up ")
"""Prepended to the prompt of a zoomed-in photo."""
SHRINK_BELOW = 0.6
"""A side below this fraction of the resolution is a shrunk photo (with a prefix and a mask)."""


@dataclass(frozen=True)
class ScaleDraw:
    """One rescaling of a square ``size``-pixel photo: ``kind`` "shrink" (the photo at ``side × side`` pasted
    with its top-left corner at ``(top, left)`` on a ``size × size`` canvas), "zoom" (the photo enlarged to
    ``side × side``, the window at ``(top, left)`` of side ``size`` kept) or "keep"; ``prefix`` goes in front
    of the prompt ("" for keep)."""

    kind: str
    side: int
    top: int
    left: int
    prefix: str


def _sides(size: int) -> tuple[range, range]:
    """The official draw's candidate sides for a ``size``-pixel photo: the shrink branch (probability 2/3,
    ``[size // 3, size]``) and the zoom branch (1/3, ``[⌊1.2 size⌋, ⌊1.4 size⌋)``), each uniform; an odd side
    becomes the even one above it."""
    return range(size // 3, size + 1), range(int(1.2 * size), max(int(1.4 * size), int(1.2 * size) + 1))


def _kind(side: int, size: int) -> str:
    return "shrink" if side < SHRINK_BELOW * size else "zoom" if side > size else "keep"


def scale_outcomes(size: int) -> dict[str, float]:
    """The probability of each kind of :class:`ScaleDraw` for a ``size``-pixel photo, exactly (keep ≈ 0.40,
    shrink ≈ 0.27, zoom ≈ 0.33 at 512)."""
    shrink_branch, zoom_branch = _sides(size)
    out = {"shrink": 0.0, "zoom": 0.0, "keep": 0.0}
    for branch, p in ((shrink_branch, 2 / 3), (zoom_branch, 1 / 3)):
        for s in branch:
            out[_kind(s + s % 2, size)] += p / len(branch)
    return out


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform in ``[low, high]`` from ``gen``."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def draw_scale(size: int, gen: torch.Generator, *, rescaled_only: bool = False) -> ScaleDraw:
    """A rescaling of a square ``size``-pixel photo drawn from ``gen`` as the official data pipeline draws it
    (module docstring); ``rescaled_only``: from the shrink and zoom outcomes only (the keep outcome redrawn),
    i.e. the distribution conditioned on the photo being rescaled."""
    shrink_branch, zoom_branch = _sides(size)
    while True:
        branch = shrink_branch if _randint(gen, 0, 2) < 2 else zoom_branch
        side = branch[_randint(gen, 0, len(branch) - 1)]
        side += side % 2
        kind = _kind(side, size)
        if kind == "shrink":
            prefix = SHRINK_PREFIXES[_randint(gen, 0, 1)]
            return ScaleDraw(kind, side, _randint(gen, 0, size - side), _randint(gen, 0, size - side), prefix)
        if kind == "zoom":
            prefix = ZOOM_PREFIXES[_randint(gen, 0, 1)]
            return ScaleDraw(kind, side, _randint(gen, 0, side - size), _randint(gen, 0, side - size), prefix)
        if not rescaled_only:
            return ScaleDraw("keep", size, 0, 0, "")


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """``(C, H, W)`` → ``(C, side, side)``, bilinear with antialiasing (as PIL's bilinear resize)."""
    return F.interpolate(x[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]


def apply_scale(pixels: torch.Tensor, mask: torch.Tensor | None,
                draw: ScaleDraw) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rescale one photo as ``draw`` says: ``pixels`` ``(3, R, R)`` in ``[−1, 1]`` and its subject mask
    ``(1, R, R)`` in ``[0, 1]`` (or None) → the same shapes: for a shrink the photo pasted on zeros (mid-gray)
    and its mask moved with it (zeros around), for a zoom the window of the enlarged photo and mask."""
    size = int(pixels.shape[-1])
    if draw.kind == "keep":
        return pixels, mask
    if draw.kind == "zoom":
        rows, cols = slice(draw.top, draw.top + size), slice(draw.left, draw.left + size)
        return _resize(pixels, draw.side)[:, rows, cols], \
            None if mask is None else _resize(mask, draw.side)[:, rows, cols].clamp(0, 1)
    rows, cols = slice(draw.top, draw.top + draw.side), slice(draw.left, draw.left + draw.side)
    canvas = torch.zeros_like(pixels)
    canvas[:, rows, cols] = _resize(pixels, draw.side)
    placed = None
    if mask is not None:
        placed = torch.zeros_like(mask)
        placed[:, rows, cols] = _resize(mask, draw.side).clamp(0, 1)
    return canvas, placed


def valid_mask(draw: ScaleDraw, size: int, latent_factor: int) -> torch.Tensor:
    """The loss mask of a rescaled ``size``-pixel photo at latent size ``(1, h, h)``, ``h = size // latent_factor``
    (pixels per latent pixel: the VAE's downsampling): for a shrink 1 on rows ``⌊top/f⌋+1`` to
    ``⌊(top+side)/f⌋−1`` (end excluded) and the same columns — the pasted square eroded by a latent pixel, as the
    official code masks it; empty when the square is too small —, else all 1."""
    h = size // latent_factor
    if draw.kind != "shrink":
        return torch.ones(1, h, h)
    out = torch.zeros(1, h, h)
    f, top, left, side = latent_factor, draw.top, draw.left, draw.side
    out[:, top // f + 1:(top + side) // f - 1, left // f + 1:(left + side) // f - 1] = 1
    return out


class ScaleAugment:
    """The rescaled half of Custom Diffusion's instance loss (module docstring): per call of :meth:`loss`,
    ``batch`` photos drawn, rescaled (:func:`draw_scale` with ``rescaled_only``), VAE-encoded, noised and
    scored, the loss masked to the rescaled photo (and to the photo's own mask when it has one).

    ``encode(prompts) -> Conditioning`` is the trainer's text path; :attr:`state` (optimizer steps done,
    int64) goes into the trainer's ``trainable()`` so that a resumed run draws what an uninterrupted one
    draws."""

    def __init__(self, base: Any, cfg: CustomDiffusionConfig, examples: list[Example], prompts: Any,
                 encode: Any, resolution: int):
        from diffusers import DDPMScheduler

        self.base, self.cfg, self.examples, self.prompts, self.encode = base, cfg, examples, prompts, encode
        self.resolution = resolution
        self.p_keep = scale_outcomes(resolution)["keep"]
        self.weight = (1.0 - self.p_keep) / self.p_keep
        pipe = base.pipe
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.precision = Precision.for_run(cfg.mixed_precision, base.device)
        self.templates = TEMPLATES.get(cfg.templates, [cfg.instance_prompt])
        self.state = torch.zeros(1, dtype=torch.int64)
        self.micro = 0
        self.last: dict[str, Any] = {}  # the last call's draws, prompts and masks (logs, tests)

    def _generator(self) -> torch.Generator:
        key = hash((int(self.cfg.seed), int(self.state[0]), self.micro, 0x5CA1E)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator().manual_seed(key)

    def batch(self) -> tuple[torch.Tensor, list[torch.Tensor | None], list[str]]:
        """This micro-step's photos before rescaling, drawn for the global batch (batch × processes, this
        process taking its slice, as the loop does): their pixels ``(B, 3, R, R)`` (mirrored where drawn),
        subject masks ``(1, R, R)`` (None for a photo without one) and prompts with the draw's prefix;
        :attr:`last` keeps the draws."""
        cfg, gen = self.cfg, self._generator()
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        n = cfg.batch_size * world
        idx = torch.randint(len(self.examples), (n,), generator=gen)
        flips = torch.randint(2, (n,), generator=gen) if cfg.flip else torch.zeros(n, dtype=torch.long)
        tpl = torch.randint(len(self.templates), (n,), generator=gen)
        draws = [draw_scale(self.resolution, gen, rescaled_only=True) for _ in range(n)]
        rows = range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        pixels: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        prompts: list[str] = []
        for r in rows:
            ex = self.examples[int(idx[r])]
            pix = ex.pixels.flip(-1) if flips[r] else ex.pixels
            m = None if ex.mask is None else (ex.mask.flip(-1) if flips[r] else ex.mask)
            pixels.append(pix)
            masks.append(m)
            # the trainer's own prompt of this photo (--instance-prompt, or the drawn template with --use-templates)
            prompts.append(draws[r].prefix + self.prompts([self.templates[int(tpl[r])]], [ex])[0])
        self.last = {"draws": [draws[r] for r in rows], "examples": [int(idx[r]) for r in rows],
                     "flips": [int(flips[r]) for r in rows], "prompts": prompts}
        return torch.stack(pixels), masks, prompts

    def loss(self) -> torch.Tensor:
        """``(1 − p_keep)/p_keep`` × the mean masked denoising loss of this micro-step's rescaled photos."""
        pipe, cfg = self.base.pipe, self.cfg
        unet, vae, device = pipe.unet, pipe.vae, self.base.device
        gen = self._generator()
        gen.manual_seed(gen.initial_seed() ^ 0x1A7E)  # the noise stream, apart from the data's
        pixels, masks, prompts = self.batch()
        self.micro += 1
        moved = [apply_scale(pixels[k], masks[k], draw) for k, draw in enumerate(self.last["draws"])]
        with torch.no_grad():
            dist = vae.encode(torch.stack([pix for pix, _ in moved]).to(device, vae.dtype)).latent_dist
        factor = self.resolution // int(dist.mean.shape[-1])
        valid = []
        for (_, m), draw in zip(moved, self.last["draws"]):
            v = valid_mask(draw, self.resolution, factor)
            valid.append(v if m is None else v * F.interpolate(m[None], size=v.shape[-2:], mode="area")[0])
        scale = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        mean, std = ((dist.mean - shift) * scale).float(), (dist.std * scale).float()
        b = mean.shape[0]
        eps = torch.randn(mean.shape, generator=gen).to(device)
        noise = torch.randn(mean.shape, generator=gen)
        if cfg.noise_offset > 0:
            noise = noise + cfg.noise_offset * torch.randn((*mean.shape[:2], 1, 1), generator=gen)
        t = torch.randint(int(self.scheduler.config.num_train_timesteps), (b,), generator=gen).to(device)
        latents, noise = mean + std * eps, noise.to(device)
        mask = torch.stack(valid).to(device)
        self.last["masks"] = mask.cpu()
        with self.precision.autocast():
            cond = self.encode(prompts)
            noisy = self.scheduler.add_noise(latents, noise, t)
            pred = unet(noisy.to(unet.dtype), t, cond.encoder_hidden_states,
                        added_cond_kwargs=cond.added_cond_kwargs).sample
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(latents, noise, t)
        err = (pred.float() - target.float()) ** 2
        per = (err * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1e-6)
        if cfg.snr_gamma > 0:  # Min-SNR weighting, as the loop weights its samples
            alphas = self.scheduler.alphas_cumprod.to(device)[t]
            snr = alphas / (1 - alphas)
            capped = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma))
            per = per * (capped / (snr + 1) if self.scheduler.config.prediction_type == "v_prediction" else capped / snr)
        return self.weight * per.mean()

    def after_step(self) -> None:
        self.state += 1
        self.micro = 0


class CustomDiffusionTrainer:
    """Trains ``ΔW_k``, ``ΔW_v`` of every cross-attention layer and the modifier token (module doc)."""

    def __init__(self, base: Any, cfg: CustomDiffusionConfig, token: str):
        self.base, self.cfg, self.token = base, cfg, token
        pipe, unet = base.pipe, base.pipe.unet
        self.table = token_table(pipe)
        store = store_of(unet)
        if self.table.entries or (store is not None and any(not h.passive for h in store.hooks.values())) \
                or getattr(pipe, "_studio_lora", None) or getattr(unet, "peft_config", None):
            raise TrainingError("Remove applied concepts from the pipeline before training.")
        self.text = f"{token} {cfg.class_word}"
        self.resolution = cfg.resolution or base.native_size
        # 1. class images come from the untouched base, before anything is installed.
        self._prior = class_prior(base, cfg, self.resolution)  # DreamBooth's: the same fields, the same cache
        self._frozen = freeze_pipeline(pipe)
        self.key = f"train-custom_diffusion:{token}"
        self.hook_key: str | None = None
        self.scale: ScaleAugment | None = None
        try:
            self._install()
            # the rescaled photos (module docstring): the trainer's own copy of the photos, as the loop loads them
            self.scale = ScaleAugment(base, cfg, load_training_images(cfg, base), self.prompts,
                                      lambda prompts: self.conditioning(prompts, self.resolution),
                                      self.resolution) if cfg.scale_augment else None
        except BaseException:
            self.teardown()
            raise

    def _install(self) -> None:
        pipe, unet, cfg = self.base.pipe, self.base.pipe.unet, self.cfg
        init = [init_embedding(tok, emb, cfg.init_token)
                for tok, emb in zip(self.table.pristine_tokenizers, self.table.original_embeddings)]
        try:
            self.table.set(self.key, [self.token], init)
        except ValueError as err:
            raise TrainingError(f"Cannot add the token {self.token}: {err}; pick another --token.") from None
        self.embeddings: list[nn.Parameter] = []
        for (_, te), v in zip(text_encoders(pipe), init):
            spliced = te.get_input_embeddings()
            p = nn.Parameter(v.clone().to(te.device, torch.float32))
            te.set_input_embeddings(SplicedEmbedding(spliced.original, p))
            self.embeddings.append(p)
        self.layers = unet_layers(unet)
        self.deltas: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        device = next(unet.parameters()).device
        for layer in self.layers:
            shape = (layer.inner_dim, layer.context_dim)
            self.deltas[layer.name] = (nn.Parameter(torch.zeros(shape, device=device)),
                                       nn.Parameter(torch.zeros(shape, device=device)))
        self.fan_in = sum(layer.context_dim for layer in self.layers) / len(self.layers)
        batch = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.lr_kv = cfg.lr if cfg.lr is not None else cfg.lr_scale / self.fan_in * (batch if cfg.scale_lr else 1)
        self.lr_token = cfg.token_lr if cfg.token_lr is not None else self.lr_kv
        self.hook_key = f"custom_diffusion:train:{self.token}"
        add_hook(unet, self.hook_key, CustomDiffusionHook(dict(self.deltas), train=True))

    def prior(self) -> PriorSet | None:
        """The class images; with the scale augmentation their weight is ``λ_prior / p_keep`` (module docstring)."""
        if self._prior is None or self.scale is None:
            return self._prior
        return PriorSet(self._prior.examples, self._prior.prompts, self._prior.weight / self.scale.p_keep)

    def trainable(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(zip(EMBEDDINGS, self.embeddings))
        for name, (dk, dv) in self.deltas.items():
            out[f"delta.{name}.to_k"], out[f"delta.{name}.to_v"] = dk, dv
        if self.scale is not None:  # run state (no gradient), checkpointed: a resumed run draws the same photos
            out["scale_augment.step"] = self.scale.state
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        kv = [p for pair in self.deltas.values() for p in pair]
        return [{"params": kv, "lr": self.lr_kv}, {"params": list(self.embeddings), "lr": self.lr_token}]

    def announce(self, log: Any) -> None:
        how = "--lr" if self.cfg.lr is not None else \
            f"{self.cfg.lr_scale:g} / K/V fan-in {self.fan_in:.0f}" + (" × batch" if self.cfg.scale_lr else "")
        log(f"learning rate: K/V {self.lr_kv:.3g} ({how}) over {len(self.layers)} cross-attention layers, "
            f"token {self.lr_token:.3g}")
        if self.scale is not None:
            log(f"random-scale augmentation: {self.cfg.batch_size} rescaled photos per step beside the loop's, weight "
                f"{self.scale.weight:.3g}; prior weight ÷ p_keep {self.scale.p_keep:.3f}")

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lr_effective": [round(self.lr_kv, 10), round(self.lr_token, 10)],
                               "fan_in": round(self.fan_in, 2), "layers": len(self.layers)}
        if self.scale is not None:
            out["scale_augment"] = {"p_keep": round(self.scale.p_keep, 6), "weight": round(self.scale.weight, 6)}
        return out

    def class_prompts(self, templates: list[str]) -> list[str]:
        """What the probe compares the instance prompt with: the class prompt of prior preservation."""
        return [self.cfg.class_text()] * len(templates)

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        chosen = templates if self.cfg.use_templates else [self.cfg.instance_prompt] * len(examples)
        return fill_templates(chosen, [ex.caption for ex in examples], self.token, self.text)

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning:
        return encode_prompts(self.base.pipe, prompts, resolution=resolution, device=self.base.device)

    def extra_loss(self) -> torch.Tensor | None:
        """The rescaled photos' weighted loss (``--scale-augment``), or None."""
        return self.scale.loss() if self.scale is not None else None

    def after_step(self) -> None:
        if self.scale is not None:
            self.scale.after_step()

    def preview_prompt(self, prompt: str) -> str:
        return prompt.format(self.text)

    def export(self) -> Concept:
        """Full trained weights ``W₀ + ΔW`` per layer (the file format; :mod:`studio.methods.custom_diffusion`)."""
        unet = self.base.pipe.unet
        kv = {}
        with torch.no_grad():
            for name, (dk, dv) in self.deltas.items():
                attn = unet.get_submodule(name)
                kv[name] = (base_weight(attn.to_k).float() + dk.float(), base_weight(attn.to_v).float() + dv.float())
        return Concept(method=CustomDiffusion.name, tokens=[self.token],
                       tensors=concept_tensors(kv, [p.detach() for p in self.embeddings]),
                       class_word=self.cfg.class_word or "", name=self.cfg.name or self.token.strip("<>"))

    def teardown(self) -> None:
        """Idempotent: the hook and the token leave, the modules get their gradient flags back."""
        if self.hook_key is not None:
            remove_hook(self.base.pipe.unet, self.hook_key)
            self.hook_key = None
        self.table.drop(self.key)
        unfreeze(self._frozen)
        self._frozen = []


ENTRY = TrainerEntry(
    cli_name="custom-diffusion", method=CustomDiffusion.name,
    help="Custom Diffusion: a modifier token + the cross-attention K/V (several concepts merge in closed form)",
    config_cls=CustomDiffusionConfig, make_trainer=CustomDiffusionTrainer, presets=PRESETS, default_preset="paper",
    min_images=1,
    gives="a modifier token + full cross-attention K/V: 77 MB on SD 1.5 (1.4 GB SDXL) in float32; concepts merge in "
          "closed form (concepts merge) and export to diffusers' loader",
)
