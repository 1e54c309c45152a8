"""The model-agnostic training loop every trainer shares (ARCHITECTURE.md, "Training").

A method supplies a :class:`MethodTrainer` (its trainable parameters, how prompts become text
conditioning, extra losses, and ``export() -> Concept``); this loop does the rest:

1. validate and load the image folder; encode it with the VAE **once** (latent mean and std of
   every image and of its mirror image — a fresh latent sample is drawn from them each step);
2. draw every random number from one seeded ``torch.Generator`` (images, flips, templates,
   timesteps, noise) for the *global* batch, so that ``accelerate launch`` with P processes and
   batch B gives the same update as one process with batch P·B (each process takes its slice and
   gradients are averaged);
3. ε or v target from the scheduler's ``prediction_type``; masked MSE when masks exist; Min-SNR
   weighting as an option;
4. gradient accumulation, mixed precision (``accelerate``), gradient checkpointing;
5. checkpoints every N steps (parameters, optimizer state, generator state — a resumed run is
   bit-identical to an uninterrupted one); a NaN guard that stops before the bad update and
   names the last good checkpoint; callbacks for progress, previews and checkpoints; a control
   hook to pause or cancel between steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from studio.concept import Concept
from studio.errors import TrainingError
from trainers.checkpoint import config_hash, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from trainers.conditioning import Conditioning
from trainers.data import Example, load_image_folder


def _f(default: Any = None, help: str = "", **meta: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class CommonTrainConfig:
    """Settings every trainer shares. The CLI flags and the UI form are derived from these fields."""

    images: str = _f("", "folder of training images (+ optional name.txt captions, name.mask.png masks)", group="data")
    out: str | None = _f(None, "output concept file (default: the library, under --name)", group="output")
    name: str | None = _f(None, "concept name in the library (default: the token)", group="output")
    token: str | None = _f(None, "trigger token, e.g. <my-dog> (default: chosen for you)", group="concept")
    class_word: str | None = _f(None, "what the subject is, e.g. dog", group="concept")
    templates: str = _f("object", "prompt templates", choices=["object", "style"], group="concept")
    steps: int = _f(500, "optimizer steps", group="training")
    lr: float = _f(1e-4, "learning rate given to the optimizer as is (never scaled by batch size)", group="training")
    batch_size: int = _f(1, "images per step per process", group="training")
    grad_accum: int = _f(1, "gradient accumulation steps", group="training")
    resolution: int | None = _f(None, "training resolution (default: the base's native size)", group="training")
    seed: int = _f(0, "random seed (data order, noise, timesteps)", group="training")
    flip: bool = _f(True, "also train on mirrored images", group="data")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="training")
    max_grad_norm: float = _f(0.0, "clip gradients to this norm (0 = off)", group="training")
    snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (0 = off; 5 is usual)", group="training")
    mixed_precision: str = _f("no", "autocast precision", choices=["no", "fp16", "bf16"], group="memory")
    gradient_checkpointing: bool = _f(False, "trade compute for memory", group="memory")
    checkpoint_every: int = _f(0, "save a resumable checkpoint every N steps (0 = off)", group="checkpoints")
    checkpoint_dir: str | None = _f(None, "where checkpoints go (default: OUT.checkpoints/)", group="checkpoints")
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep", group="checkpoints")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to continue from", group="checkpoints")
    preview_every: int = _f(0, "render a preview every N steps (0 = off)", group="previews")
    preview_prompt: str | None = _f(None, "preview prompt (default: 'a photo of {}')", group="previews")
    log_every: int = _f(10, "report the loss every N steps", group="previews")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise TrainingError(f"lr must be a non-negative number, got {self.lr}.")
        if self.resolution is not None and self.resolution < 8:
            raise TrainingError(f"resolution must be at least 8 pixels, got {self.resolution}.")
        if self.checkpoint_every < 0 or self.preview_every < 0:
            raise TrainingError("checkpoint_every and preview_every must be ≥ 0.")


class TrainCallbacks:
    """Override what you need; every hook is optional."""

    def on_start(self, total_steps: int, start_step: int) -> None: ...
    def on_step(self, step: int, total: int, loss: float, seconds: float) -> None: ...
    def on_preview(self, step: int, images: list[Image.Image]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_log(self, message: str) -> None: ...


class TrainControl:
    """Polled between optimizer steps: return ``"pause"`` or ``"cancel"`` to stop."""

    def poll(self) -> str | None:
        return None


class TrainingStopped(Exception):
    """Raised when a :class:`TrainControl` paused (after a checkpoint) or cancelled the run."""

    def __init__(self, reason: str, step: int, checkpoint: Path | None):
        super().__init__(f"training {reason} at step {step}")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


class MethodTrainer(Protocol):
    """What a method gives the loop (see trainers/textual_inversion.py for an example)."""

    def trainable(self) -> dict[str, torch.Tensor]:
        """Name → parameter (these and only these receive gradients; checkpointed by name)."""
        ...

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups (``{"params": [...], "lr": ...}``)."""
        ...

    def prompts(self, templates: list[str], examples: list[Example]) -> list[str]:
        """The training prompt of each sample (templates are already chosen per sample)."""
        ...

    def conditioning(self, prompts: list[str], resolution: int) -> Conditioning: ...

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the diffusion loss (or None)."""
        ...

    def after_step(self) -> None: ...

    def preview_prompt(self, prompt: str) -> str:
        """The preview prompt, ``{}`` replaced by the concept's training text."""
        ...

    def export(self) -> Concept: ...

    def teardown(self) -> None:
        """Put the pipeline back as it was."""
        ...


@dataclass
class LatentCache:
    """VAE posteriors of every example and its mirror: mean/std (N, 2, C, h, w); masks (N, 2, 1, h, w)."""

    mean: torch.Tensor
    std: torch.Tensor
    masks: torch.Tensor | None


@torch.no_grad()
def encode_examples(vae: Any, examples: list[Example], device: torch.device, dtype: torch.dtype) -> LatentCache:
    means, stds, masks = [], [], []
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    any_mask = any(e.mask is not None for e in examples)
    for ex in examples:
        pix = torch.stack([ex.pixels, ex.pixels.flip(-1)]).to(device, dtype)
        dist = vae.encode(pix).latent_dist
        means.append(((dist.mean - shift) * scale).float().cpu())
        stds.append((dist.std * scale).float().cpu())
        if any_mask:
            m = ex.mask if ex.mask is not None else torch.ones_like(ex.pixels[:1])
            m = torch.stack([m, m.flip(-1)])
            masks.append(F.interpolate(m, size=means[-1].shape[-2:], mode="area"))
    return LatentCache(torch.stack(means), torch.stack(stds), torch.stack(masks) if any_mask else None)


@dataclass
class TrainResult:
    concept: Concept
    path: Path | None
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def _snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1 - alphas)


def run_training(base: Any, trainer: MethodTrainer, cfg: CommonTrainConfig, *, method: str,
                 examples: list[Example] | None = None, callbacks: TrainCallbacks | None = None,
                 control: TrainControl | None = None, accelerator: Any = None, save: bool = True) -> TrainResult:
    """Train and return the exported concept (written atomically to ``cfg.out`` when ``save``)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    cb = callbacks or TrainCallbacks()
    control = control or TrainControl()
    pipe = base.pipe
    acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=base.device.type == "cpu")
    device = base.device
    resolution = cfg.resolution or base.native_size
    out_path = Path(cfg.out).expanduser() if cfg.out else None
    ckpt_dir = Path(cfg.checkpoint_dir).expanduser() if cfg.checkpoint_dir else (
        out_path.with_suffix(".checkpoints") if out_path else None)
    if (cfg.checkpoint_every or cfg.resume) and ckpt_dir is None:
        raise TrainingError("Checkpoints need --checkpoint-dir or --out to know where to go.")

    # 1. data, encoded once.
    if examples is None:
        examples = load_image_folder(cfg.images, resolution)
    cache = encode_examples(pipe.vae, examples, device, pipe.vae.dtype)
    n_examples = len(examples)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train_t = int(scheduler.config.num_train_timesteps)
    prediction = scheduler.config.prediction_type

    # 2. optimizer over exactly the method's parameters.
    trainable = trainer.trainable()
    optimizer = torch.optim.AdamW(trainer.param_groups(), weight_decay=cfg.weight_decay)
    optimizer = acc.prepare_optimizer(optimizer, device_placement=False)
    rng = torch.Generator().manual_seed(cfg.seed)
    world, rank = acc.num_processes, acc.process_index
    meta = {"method": method, "config_hash": config_hash(asdict(cfg))}

    start = 0
    if cfg.resume:
        found = resolve_resume(cfg.resume, ckpt_dir) if ckpt_dir or cfg.resume != "latest" else None
        if found is not None:
            start, saved = load_checkpoint(found, trainable, optimizer, rng)
            if saved.get("config_hash") != meta["config_hash"] or saved.get("method") != method:
                raise TrainingError(f"Checkpoint {found} was made with other settings; resume with the same "
                                    "settings (only --steps and output/logging options may change).")
            cb.on_log(f"resumed from {found} at step {start}")
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    templates = _templates(cfg.templates)
    total = cfg.steps
    cb.on_start(total, start)
    t0 = time.monotonic()
    losses: list[float] = []
    last_ckpt: Path | None = list_checkpoints(ckpt_dir)[-1] if ckpt_dir and list_checkpoints(ckpt_dir) else None
    try:
        for step in range(start, total):
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                # 3. the global batch from the shared generator; this process takes its slice.
                bg = cfg.batch_size * world
                idx = torch.randint(n_examples, (bg,), generator=rng)
                flips = torch.randint(2, (bg,), generator=rng) if cfg.flip else torch.zeros(bg, dtype=torch.long)
                tpl = torch.randint(len(templates), (bg,), generator=rng)
                timesteps = torch.randint(n_train_t, (bg,), generator=rng)
                eps_lat = torch.randn((bg, *cache.mean.shape[2:]), generator=rng)
                noise = torch.randn((bg, *cache.mean.shape[2:]), generator=rng)
                sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
                idx, flips, tpl, timesteps, eps_lat, noise = (x[sl] for x in (idx, flips, tpl, timesteps, eps_lat, noise))
                latents = cache.mean[idx, flips] + cache.std[idx, flips] * eps_lat
                latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
                prompts = trainer.prompts([templates[int(i)] for i in tpl], [examples[int(i)] for i in idx])
                with acc.autocast():
                    cond = trainer.conditioning(prompts, resolution)
                    pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, cond.encoder_hidden_states,
                                     added_cond_kwargs=cond.added_cond_kwargs).sample
                err = (pred.float() - target.float()) ** 2
                if cache.masks is not None:
                    m = cache.masks[idx, flips].to(device)
                    per = (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1e-6)
                else:
                    per = err.mean(dim=(1, 2, 3))
                if cfg.snr_gamma > 0:
                    snr = _snr(scheduler, timesteps)
                    w = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma)) / snr
                    if prediction == "v_prediction":
                        w = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma)) / (snr + 1)
                    per = per * w
                loss = per.mean()
                extra = trainer.extra_loss()
                total_loss = loss + extra if extra is not None else loss
                if not torch.isfinite(total_loss.detach()):
                    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                    raise TrainingError(f"The loss became {float(total_loss)} at step {step + 1} (learning rate too "
                                        f"high?); training stopped before the bad update{where}. Lower --lr and "
                                        "resume.")
                acc.backward(total_loss / cfg.grad_accum)
                step_loss += float(total_loss.detach()) / cfg.grad_accum
            # 4. average gradients over processes (exactly DDP's mean), then step.
            for p in trainable.values():
                if p.grad is not None and world > 1:
                    p.grad = acc.reduce(p.grad, reduction="mean")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not all(torch.isfinite(p).all() for p in trainable.values()):
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise TrainingError(f"The weights became NaN/inf at step {step + 1} (learning rate too high?){where}.")
            trainer.after_step()
            done = step + 1
            losses.append(step_loss)
            cb.on_step(done, total, step_loss, time.monotonic() - t0)
            if cfg.log_every and done % cfg.log_every == 0:
                cb.on_log(f"step {done}/{total} loss {step_loss:.4f}")
            if ckpt_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
                last_ckpt = _checkpoint(acc, ckpt_dir, done, trainable, optimizer, rng, meta, cfg.keep_checkpoints)
                if last_ckpt:
                    cb.on_checkpoint(done, last_ckpt)
            if cfg.preview_every and done % cfg.preview_every == 0 and acc.is_main_process:
                cb.on_preview(done, preview(pipe, trainer, cfg, resolution))
            request = control.poll()
            if request in ("pause", "cancel") and done < total:
                path = None
                if request == "pause" and ckpt_dir is not None:
                    path = _checkpoint(acc, ckpt_dir, done, trainable, optimizer, rng, meta, cfg.keep_checkpoints)
                raise TrainingStopped("paused" if request == "pause" else "cancelled", done, path)
        concept = trainer.export()
    finally:
        if cfg.gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        trainer.teardown()
    concept.train = asdict(cfg) | {"method": method, "base": base.spec, "processes": world,
                                   "final_loss": losses[-1] if losses else None}
    concept.base = base.fingerprint()
    written = None
    if save and out_path is not None and acc.is_main_process:
        from studio.concept import save_concept

        written = save_concept(concept, out_path)
    acc.wait_for_everyone()
    return TrainResult(concept=concept, path=written, steps=total, seconds=time.monotonic() - t0, losses=losses)


def _checkpoint(acc: Any, folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: Any,
                rng: torch.Generator, meta: dict[str, Any], keep: int) -> Path | None:
    path = None
    if acc.is_main_process:
        path = save_checkpoint(folder, step, trainable, optimizer, rng, meta, keep)
    acc.wait_for_everyone()
    return path


def _templates(kind: str) -> list[str]:
    from trainers.templates import TEMPLATES

    try:
        return TEMPLATES[kind]
    except KeyError:
        raise TrainingError(f"Unknown templates {kind!r}; use one of {', '.join(TEMPLATES)}.") from None


@torch.no_grad()
def preview(pipe: Any, trainer: MethodTrainer, cfg: CommonTrainConfig, resolution: int, steps: int = 20) -> list[Image.Image]:
    """One preview image with the concept as it is now (fixed seed, so previews are comparable)."""
    prompt = trainer.preview_prompt(cfg.preview_prompt or "a photo of {}")
    gen = torch.Generator().manual_seed(cfg.seed)
    return pipe(prompt=prompt, num_inference_steps=steps, generator=gen, width=resolution, height=resolution,
                output_type="pil").images
