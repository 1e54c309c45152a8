"""The model-agnostic training loop every trainer shares (docs/architecture.md, "Training").

A method supplies a :class:`MethodTrainer` (its trainable parameters, how prompts become text
conditioning, extra losses, and ``export() -> Concept``); this loop does the rest:

1. validate and load the image folder; encode it with the VAE **once** (latent mean and std of
   every image and of its mirror image — a fresh latent sample is drawn from them each step;
   each image when first drawn, and kept on disk for the next run: :mod:`trainers.latents`);
   with ``--buckets`` each image keeps its own aspect ratio (:mod:`trainers.buckets`): batches are
   drawn within one bucket and SDXL's ``time_ids`` carry each image's size and crop;
2. draw every random number from one seeded ``torch.Generator`` (images, flips, templates,
   timesteps, noise) for the *global* batch, so that ``accelerate launch`` with P processes and
   batch B gives the same update as one process with batch P·B (each process takes its slice and
   gradients are averaged);
3. ε or v target from the scheduler's ``prediction_type`` (SD 3 / FLUX: the flow-matching velocity,
   :mod:`trainers.flow`); masked MSE when masks exist; Min-SNR
   weighting and offset noise as options; **prior preservation** when the method supplies class
   images (:class:`PriorSet`): every step trains on ``[instance batch ; class batch]`` in one
   forward, ``L = L_inst + w_prior · L_class`` (DreamBooth, Ruiz et al. 2023, eq. 2), the class
   batch drawn from the same generator right after the instance batch;
4. gradient accumulation, mixed precision (:mod:`trainers.precision`: float32 trained tensors,
   autocast, fp16 loss scaling), gradient checkpointing, ``--compile`` / ``--channels-last``;
5. checkpoints every N steps (parameters, optimizer state, generator state — a resumed run is
   bit-identical to an uninterrupted one); a NaN guard that stops before the bad update and
   names the last good checkpoint; callbacks for progress, previews and checkpoints; a control
   hook to pause or cancel between steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from studio.concept import Concept
from studio.configs import option
from studio.errors import TrainingError
from studio.models.speed import unet_speedups
from trainers.buckets import BucketBatchSampler, bucket_step, make_buckets
from trainers.checkpoint import (
    config_hash,
    data_digest,
    last_good_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from trainers.conditioning import Conditioning, with_time_ids
from trainers.data import Example, load_image_folder
from trainers.flow import FLOW_DEFAULTS, FlowFit
from trainers.latents import LatentStore, encode_examples
from trainers.precision import Precision, check_trainable, precision_note
from trainers.probe import AutoBudget, DenoisingProbe, verdict


@dataclass
class CommonTrainConfig:
    """Settings every trainer shares. The CLI flags and the UI form are derived from these fields."""

    images: str = option("", "folder of training images (+ optional name.txt captions, name.mask.png masks)", group="data")
    out: str | None = option(None, "output concept file (default: the library, under --name)", group="output")
    name: str | None = option(None, "concept name in the library (default: the token)", group="output")
    token: str | None = option(None, "trigger token, e.g. <my-dog> (default: chosen for you)", group="concept")
    class_word: str | None = option(None, "what the subject is, e.g. dog", group="concept")
    templates: str = option("object", "prompt templates", choices=["object", "style"], group="concept")
    steps: int = option(500, "optimizer steps", group="training")
    lr: float | None = option(1e-4, "learning rate given to the optimizer as is (never scaled by batch size)", group="training")
    batch_size: int = option(1, "images per step per process", group="training")
    grad_accum: int = option(1, "gradient accumulation steps", group="training")
    resolution: int | None = option(None, "training resolution (default: the base's native size)", group="training")
    seed: int = option(0, "random seed (data order, noise, timesteps)", group="training")
    flip: bool = option(True, "also train on mirrored images", group="data")
    buckets: bool = option(False, "aspect-ratio buckets: train each image near its own aspect ratio; off by default — "
                           "square sets need none", group="data")
    bucket_step: int = option(0, "with --buckets: bucket sides are multiples of this many pixels, a multiple of the "
                              "base's VAE factor (0 = derived from the base: 64 on SD 1.5 and SDXL)", group="data")
    weight_decay: float = option(0.0, "AdamW weight decay", group="training")
    max_grad_norm: float = option(0.0, "clip gradients to this norm (0 = off)", group="training")
    snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma (0 = off; 5 is usual)", group="training")
    noise_offset: float = option(0.0, "offset noise: add this × a per-channel constant to the noise (0 = off; 0.05–0.1 "
                             "helps very dark/bright images)", group="training")
    optimizer: str = option("adamw", "adamw, or adamw8bit (bitsandbytes, CUDA: a quarter of the optimizer memory)",
                        choices=["adamw", "adamw8bit"], group="memory")
    mixed_precision: str = option("no", "autocast precision of the forward (trained tensors stay float32; the frozen "
                                  "weights keep --dtype's; fp16 adds loss scaling and needs a GPU, bf16 also runs on "
                                  "a CPU)", choices=["no", "fp16", "bf16"], group="memory")
    compile: bool = option(False, "torch.compile the UNet for the run (minutes of compiling first; pays off over "
                           "long runs on a GPU)", group="speed")
    channels_last: bool = option(False, "keep the UNet's convolution weights in channels-last layout for the run "
                                 "(faster convolutions on recent GPUs)", group="speed")
    gradient_checkpointing: bool = option(False, "trade compute for memory", group="memory")
    checkpoint_every: int = option(0, "save a resumable checkpoint every N steps (0 = off)", group="checkpoints")
    checkpoint_dir: str | None = option(None, "where checkpoints go (default: OUT.checkpoints/)", group="checkpoints")
    keep_checkpoints: int = option(3, "how many recent checkpoints to keep", group="checkpoints")
    resume: str | None = option(None, "'latest' or a checkpoint folder to continue from", group="checkpoints")
    preview_every: int = option(0, "render a preview every N steps (0 = off)", group="previews")
    preview_prompt: str | None = option(None, "preview prompt (default: 'a photo of {}')", group="previews")
    log_every: int = option(10, "report the loss every N steps", group="previews")
    budget: str = option("auto", "auto: measure the denoising gain every --probe-every steps and stop when it stops "
                         "improving (--steps is then the cap), keeping the latest step tied with the best; "
                         "fixed: train --steps steps",
                         choices=["auto", "fixed"], group="training")
    probe_every: int = option(0, "with --budget auto: steps between measurements (0 = a tenth of --steps, at "
                              "least 10)", group="training")
    probe: bool = option(True, "measure the concept's denoising gain over the class prompt on fixed held-out noises "
                         "at the start and the end: the verdict (learned / weak / not learned) and the measured "
                         "initialization read it", group="evaluation")
    eval_every: int = option(0, "score the concept every N steps (and at the end) on held-out prompts; the curve goes "
                         "into its metadata (0 = off)", group="evaluation")
    eval_model: str | None = option(None, "CLIP hub id or folder scoring --eval-every, or 'oracle' (the demo world's; "
                                "the default on --base demo; else openai/clip-vit-base-patch32)", group="evaluation",
                                path="model", names=("oracle",))
    eval_prompts: str | None = option(None, "file of held-out prompts, {} = the concept (default: 4 DreamBench prompts; "
                                  "the world's on --base demo)", group="evaluation", path="file")
    eval_images: int = option(2, "images per held-out prompt", group="evaluation")
    eval_steps: int = option(20, "sampler steps of the evaluation images", group="evaluation")
    keep_best: bool = option(False, "export the best evaluated step (fidelity × editability), not the last",
                         group="evaluation")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr is None and not self.derives_lr():
            raise TrainingError("Give --lr: this method has no rule to derive a learning rate from the base.")
        if self.lr is not None and not (self.lr >= 0 and math.isfinite(self.lr)):
            raise TrainingError(f"lr must be a non-negative number, got {self.lr}.")
        if self.resolution is not None and self.resolution < 8:
            raise TrainingError(f"resolution must be at least 8 pixels, got {self.resolution}.")
        if self.bucket_step < 0:
            raise TrainingError(f"bucket_step must be ≥ 0 (0 = derived from the base), got {self.bucket_step}.")
        if not self.probe:
            self.budget = "fixed"  # nothing to watch: --no-probe trains --steps steps
        if self.probe_every < 0:
            raise TrainingError(f"probe_every must be ≥ 0, got {self.probe_every}.")
        if self.checkpoint_every < 0 or self.preview_every < 0:
            raise TrainingError("checkpoint_every and preview_every must be ≥ 0.")
        if not (self.noise_offset >= 0 and math.isfinite(self.noise_offset)):
            raise TrainingError(f"noise_offset must be a non-negative number, got {self.noise_offset}.")
        if self.eval_every < 0 or self.eval_images < 1 or self.eval_steps < 1:
            raise TrainingError(f"eval_every must be ≥ 0 and eval_images, eval_steps ≥ 1; got {self.eval_every}, "
                                f"{self.eval_images}, {self.eval_steps}.")
        if self.keep_best and not self.eval_every:
            raise TrainingError("--keep-best needs --eval-every N: the evaluated steps it chooses from.")

    def token_candidates(self) -> list[str]:
        """Default trigger tokens to try in order when ``--token`` is not given; empty = derive one
        from ``--name`` / ``--class-word`` (see ``trainers.runner.choose_token``)."""
        return []

    def derives_lr(self) -> bool:
        """True when ``lr=None`` means the method derives the rate from the base (textual inversion)."""
        return False

    def writes_folder(self) -> bool:
        """True when the result is a whole model written as a diffusers folder (``--out DIR``), not
        a concept file; the trainer then has ``save_model(path, record) -> Path``."""
        return False


class TrainCallbacks:
    """Override what you need; every hook is optional."""

    def on_start(self, total_steps: int, start_step: int) -> None: ...
    def on_step(self, step: int, total: int, loss: float, seconds: float) -> None: ...
    def on_preview(self, step: int, images: list[Image.Image]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_log(self, message: str) -> None: ...
    def on_eval(self, step: int, concept: Concept) -> None:
        """Every ``eval_every`` steps and at the end (main process): the concept as exported now; the
        pipeline holds it as trained so far (``trainers.runner`` scores it here)."""


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

    # Optional hooks, looked up with getattr (methods that do not need them leave them out):
    #   prior() -> PriorSet | None         class images for prior preservation (DreamBooth)
    #   save_model(path, record) -> Path   write the whole model when cfg.writes_folder()


@dataclass
class PriorSet:
    """Prior-preservation data: class images (generated by the base or the user's), the prompt of
    each (``"a photo of a dog"``), and ``w_prior``."""

    examples: list[Example]
    prompts: list[str]
    weight: float = 1.0


@dataclass
class TrainResult:
    concept: Concept
    path: Path | None
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def _noise(rng: torch.Generator, shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """ε ~ N(0, I) of ``shape`` (B, C, h, w); with ``offset`` > 0 plus ``offset`` × a per-(sample, channel)
    constant (offset noise), drawn after ε so that runs without it draw exactly as before."""
    noise = torch.randn(shape, generator=rng)
    if offset > 0:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=rng)
    return noise


def _optimizer(cfg: CommonTrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (imported only when asked for)."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("--optimizer adamw8bit needs bitsandbytes, which is not installed; pip install "
                                "bitsandbytes (CUDA GPUs), or use --optimizer adamw.") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1 - alphas)


def run_training(base: Any, trainer: MethodTrainer, cfg: CommonTrainConfig, *, method: str,
                 examples: list[Example] | None = None, callbacks: TrainCallbacks | None = None,
                 control: TrainControl | None = None, accelerator: Any = None, save: bool = True) -> TrainResult:
    """Train and return the exported concept (written atomically to ``cfg.out`` when ``save``).

    The pipeline is always handed back clean (``trainer.teardown()``), whatever happens."""
    try:
        return _run(base, trainer, cfg, method=method, examples=examples, callbacks=callbacks, control=control,
                    accelerator=accelerator, save=save)
    finally:
        trainer.teardown()


def load_training_images(cfg: CommonTrainConfig, base: Any, *, min_images: int = 1) -> list[Example]:
    """The examples of ``cfg.images`` as training will see them: square crops at the training
    resolution, or with ``cfg.buckets`` each in its aspect-ratio bucket (:mod:`trainers.buckets`)."""
    resolution = cfg.resolution or base.native_size
    buckets = make_buckets(resolution, bucket_step(base.pipe, resolution, cfg.bucket_step)) if cfg.buckets else None
    return load_image_folder(cfg.images, resolution, min_images=min_images, buckets=buckets)


def _hashed_config(cfg: CommonTrainConfig) -> dict[str, Any]:
    """The settings a checkpoint's config hash covers: without buckets their options are left out,
    so checkpoints written before the options existed still resume."""
    values = asdict(cfg)
    for speed_only in ("compile", "channels_last"):  # how fast, not what is computed: a run may resume without
        values.pop(speed_only, None)
    for name, default in FLOW_DEFAULTS.items():  # flow options at their defaults: older checkpoints still resume
        if name in values and values[name] == default:
            values.pop(name)
    if not cfg.buckets:
        values.pop("buckets", None)
        values.pop("bucket_step", None)
    return values


def _gain_at_start(probe: DenoisingProbe, trainer: MethodTrainer) -> float:
    """``probe.gain(trainer)`` before step 1. When the measured initialization has just taken L(concept) of
    the start it chose on this probe (``trainer.start_loss``: the same tensors on the same fixed samples,
    so the same number), only L(class) is measured here: one probe pass instead of two."""
    known = getattr(trainer, "start_loss", None)
    if known is None or known[0] is not probe:
        return probe.gain(trainer)
    plain = probe.loss(trainer, concept=False)
    return 1.0 - known[1] / max(plain, 1e-12)  # DenoisingProbe.gain's ratio (tests/test_startup.py holds them equal)


def checkpoint_folder(checkpoint_dir: str | None, out: str | None) -> Path | None:
    """Where a run's checkpoints go: ``checkpoint_dir``, else ``OUT.checkpoints/`` beside the output."""
    if checkpoint_dir:
        return Path(checkpoint_dir).expanduser()
    return Path(out).expanduser().with_suffix(".checkpoints") if out else None


def _run(base: Any, trainer: MethodTrainer, cfg: CommonTrainConfig, *, method: str, examples: list[Example] | None,
         callbacks: TrainCallbacks | None, control: TrainControl | None, accelerator: Any, save: bool) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    cb = callbacks or TrainCallbacks()
    control = control or TrainControl()
    pipe = base.pipe
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer  # SD 3 / FLUX: transformer
    # Mixed precision is this run's own (trainers.precision), not accelerate's process-wide mode.
    acc = accelerator or Accelerator(mixed_precision="no", cpu=base.device.type == "cpu")
    device = base.device
    precision = Precision.for_run(cfg.mixed_precision, device)
    resolution = cfg.resolution or base.native_size
    out_path = Path(cfg.out).expanduser() if cfg.out else None
    ckpt_dir = checkpoint_folder(cfg.checkpoint_dir, cfg.out)
    if (cfg.checkpoint_every or cfg.resume) and ckpt_dir is None:
        raise TrainingError("Checkpoints need --checkpoint-dir or --out to know where to go.")

    # 1. data, encoded once.
    if examples is None:
        examples = load_training_images(cfg, base)
    # each example when first needed (the probe needs them all), read from the store if encoded before
    store = LatentStore.for_base(base)
    cache = encode_examples(pipe.vae, examples, device, pipe.vae.dtype, lazy=True, store=store)
    if not cfg.buckets and not cache.uniform:
        raise TrainingError("The training images were prepared at different sizes; train them with --buckets.")
    n_examples = len(examples)
    prior: PriorSet | None = trainer.prior() if hasattr(trainer, "prior") else None
    prior_cache = encode_examples(pipe.vae, prior.examples, device, pipe.vae.dtype, lazy=True, store=store) \
        if prior else None
    if prior_cache is not None and not prior_cache.uniform:
        raise TrainingError("The class images were prepared at different sizes; they must share one size.")
    # SD 3 / FLUX: only the number of levels is read (trainers.flow turns the loop's draws into σ)
    scheduler: Any = DDPMScheduler() if getattr(base, "is_flow", False) else DDPMScheduler.from_config(pipe.scheduler.config)
    n_train_t = int(scheduler.config.num_train_timesteps)
    prediction = scheduler.config.prediction_type

    templates = _templates(cfg.templates)
    # 2. the probe (fixed held-out noises on the training images): the measured initialization
    #    chooses among the method's candidates by it, and the verdict reads its gain at the end.
    probe = None
    flow = bool(getattr(base, "is_flow", False))  # SD 3 / FLUX: the flow-matching objective (trainers.flow)
    if cfg.probe and getattr(trainer, "measurable", True):  # on SD 3 / FLUX it measures the flow loss at fixed σ
        probe = DenoisingProbe(pipe, cache, scheduler, examples, templates, class_text=cfg.class_word or "",
                               resolution=resolution, seed=cfg.seed,
                               flow=FlowFit.for_base(base, cfg, precision) if flow else None)
        if hasattr(trainer, "choose_init"):
            trainer.choose_init(probe, cb.on_log)
        gain_start = _gain_at_start(probe, trainer)
    if hasattr(trainer, "announce"):  # what the method derived from this base (effective rates), before step 1
        trainer.announce(cb.on_log)
    # 3. optimizer over exactly the method's parameters.
    trainable = trainer.trainable()
    check_trainable(trainable, precision)  # float32 master values under any autocast
    note = precision_note(pipe, precision)
    if note:
        cb.on_log(note)
    optimizer = _optimizer(cfg, trainer.param_groups())
    optimizer = acc.prepare_optimizer(optimizer, device_placement=False)
    stepper = _stepped(optimizer, acc)  # what the step path calls (checkpoints keep the prepared one)
    rng = torch.Generator().manual_seed(cfg.seed)
    world, rank = acc.num_processes, acc.process_index
    meta = {"method": method, "config_hash": config_hash(_hashed_config(cfg)), "data": data_digest(examples)}
    # buckets: each global batch from one bucket, a function of the seed and the batch's number
    sampler = BucketBatchSampler([ex.size for ex in examples], cfg.batch_size * world, cfg.seed) \
        if cfg.buckets else None

    total = cfg.steps
    watch = AutoBudget(probe, trainable, every=cfg.probe_every or max(10, total // 10)) \
        if cfg.budget == "auto" and probe is not None else None
    # what a checkpoint holds: the trained tensors (+ the auto budget's best-step buffers)
    ckpt_tensors = trainable | (watch.tensors() if watch is not None else {})

    def ckpt_meta() -> dict[str, Any]:
        return meta | ({"budget": watch.state()} if watch is not None else {}) | \
            ({"precision": precision.state()} if precision.scaler is not None else {})

    start = 0
    if cfg.resume:
        # latest: the newest checkpoint that verifies (checksum, finite); skipped ones are reported
        found = resolve_resume(cfg.resume, ckpt_dir, log=cb.on_log) if ckpt_dir or cfg.resume != "latest" else None
        if found is not None:
            start, saved = load_checkpoint(found, ckpt_tensors, optimizer, rng)
            if any(saved.get(k) != meta[k] for k in ("config_hash", "method", "data")):
                raise TrainingError(f"Checkpoint {found} was made with other settings; resume with the same "
                                    "settings (only --steps and output/logging options may change).")
            if watch is not None:
                watch.load_state(saved.get("budget"))
            precision.load_state(saved.get("precision"))  # the fp16 loss scale
            cb.on_log(f"resumed from {found} at step {start}")
        else:  # `resume latest` on a first run (a queued job always asks for it): say so, never silently
            cb.on_log(f"no checkpoint found under {ckpt_dir}; starting from step 0")
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    speed = contextlib.ExitStack()  # --channels-last / --compile, undone in the finally below
    speed.enter_context(unet_speedups(denoiser, channels_last=cfg.channels_last, compile=cfg.compile))
    fit: Any = FlowFit.for_base(base, cfg, precision) if flow else _Fit(denoiser, scheduler, prediction, precision)
    stopped_at: int | None = None
    cb.on_start(total, start)
    t0 = time.monotonic()
    losses: list[float] = []
    last_ckpt: Path | None = None  # the newest checkpoint this run wrote
    try:
        for step in range(start, total):
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                # 3. the global batch from the shared generator; this process takes its slice.
                bg = cfg.batch_size * world
                if sampler is None:
                    idx = torch.randint(n_examples, (bg,), generator=rng)
                else:  # one bucket; numbered batches, so a resumed run draws what this one would have
                    idx = torch.tensor(sampler.batch(step * cfg.grad_accum + micro), dtype=torch.long)
                flips = torch.randint(2, (bg,), generator=rng) if cfg.flip else torch.zeros(bg, dtype=torch.long)
                tpl = torch.randint(len(templates), (bg,), generator=rng)
                timesteps = torch.randint(n_train_t, (bg,), generator=rng)
                shape = cache.shape(int(idx[0]))
                eps_lat = torch.randn((bg, *shape), generator=rng)
                noise = _noise(rng, (bg, *shape), cfg.noise_offset)
                sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
                idx, flips, tpl, timesteps, eps_lat, noise = (x[sl] for x in (idx, flips, tpl, timesteps, eps_lat, noise))
                latents = cache.sample(idx, flips, eps_lat)
                prompts = trainer.prompts([templates[int(i)] for i in tpl], [examples[int(i)] for i in idx])
                time_ids = [examples[int(i)].time_ids(bool(f)) for i, f in zip(idx, flips)]
                n_inst = len(idx)
                m = cache.mask(idx, flips).to(device) if cache.has_masks else None  # instance images only
                if hasattr(trainer, "loss_mask"):  # the method's own masks of these rows (Break-A-Scene: the drawn
                    m = trainer.loss_mask(idx, flips, shape[-2:]).to(device)  # concepts' union), after prompts()
                parts = None  # (latents, noise, timesteps) of the class half when it cannot join the instance half
                if prior is not None and prior_cache is not None:  # the class half of the batch: (2B, C, h, w)
                    c_idx = torch.randint(len(prior.examples), (bg,), generator=rng)
                    c_flips = torch.randint(2, (bg,), generator=rng) if cfg.flip else torch.zeros(bg, dtype=torch.long)
                    c_t = torch.randint(n_train_t, (bg,), generator=rng)
                    c_eps = torch.randn((bg, *prior_cache.shape(0)), generator=rng)
                    c_noise = _noise(rng, (bg, *prior_cache.shape(0)), cfg.noise_offset)
                    c_idx, c_flips, c_t, c_eps, c_noise = (x[sl] for x in (c_idx, c_flips, c_t, c_eps, c_noise))
                    c_lat = prior_cache.sample(c_idx, c_flips, c_eps)
                    if c_lat.shape == latents.shape:
                        latents, noise = torch.cat([latents, c_lat]), torch.cat([noise, c_noise])
                        timesteps = torch.cat([timesteps, c_t])
                    else:  # buckets: this bucket and the (square) class images differ in size
                        parts = (c_lat.to(device), c_noise.to(device), c_t.to(device))
                    prompts = prompts + [prior.prompts[int(i)] for i in c_idx]
                    time_ids += [prior.examples[int(i)].time_ids(bool(f)) for i, f in zip(c_idx, c_flips)]
                latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
                with precision.autocast():
                    cond = trainer.conditioning(prompts, resolution)
                if sampler is not None:  # each image's own size and crop (SDXL micro-conditioning)
                    cond = with_time_ids(cond, time_ids)
                if parts is None:
                    per = fit.per_sample(latents, noise, timesteps, cond, m)
                else:  # two UNet calls — the same loss as one: the UNet treats each sample on its own
                    per = torch.cat([fit.per_sample(latents, noise, timesteps, _rows(cond, slice(0, n_inst)), m),
                                     fit.per_sample(*parts, _rows(cond, slice(n_inst, None)), None)])
                    timesteps = torch.cat([timesteps, parts[2]])
                if cfg.snr_gamma > 0:
                    snr = _snr(scheduler, timesteps)
                    w = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma)) / snr
                    if prediction == "v_prediction":
                        w = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma)) / (snr + 1)
                    per = per * w
                loss = per[:n_inst].mean()
                if prior is not None:
                    loss = loss + prior.weight * per[n_inst:].mean()
                extra = trainer.extra_loss()
                total_loss = loss + extra if extra is not None else loss
                value = float(total_loss.detach())  # the one read of the loss per micro-step: guard and log
                if not math.isfinite(value):
                    where = _last_good(ckpt_dir)
                    raise TrainingError(f"The loss became {value} at step {step + 1} (learning rate too "
                                        f"high?); training stopped before the bad update{where}. Lower --lr and "
                                        "resume.")
                precision.backward(total_loss / cfg.grad_accum)  # scaled under fp16
                step_loss += value / cfg.grad_accum
            # 4. average gradients over processes (exactly DDP's mean), then step.
            for p in trainable.values():
                if p.grad is not None and world > 1:
                    p.grad = acc.reduce(p.grad, reduction="mean")
            precision.unscale(stepper)  # fp16: true gradients before clipping
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
            precision.step(stepper)  # fp16: skipped when a gradient overflowed
            stepper.zero_grad(set_to_none=True)
            if not _all_finite(trainable.values()):
                where = _last_good(ckpt_dir)
                raise TrainingError(f"The weights became NaN/inf at step {step + 1} (learning rate too high?){where}.")
            trainer.after_step()
            done = step + 1
            losses.append(step_loss)
            if watch is not None and watch.due(done) and watch.measure(done, trainer, trainable, cb.on_log):
                cb.on_log(f"step {done}: the denoising gain stopped improving (best {watch.best_gain:+.3f} at step "
                          f"{watch.best_step}); stopping")
                stopped_at = done
                break
            cb.on_step(done, total, step_loss, time.monotonic() - t0)
            if cfg.log_every and done % cfg.log_every == 0:
                cb.on_log(f"step {done}/{total} loss {step_loss:.4f}")
            if ckpt_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
                last_ckpt = _checkpoint(acc, ckpt_dir, done, ckpt_tensors, optimizer, rng, ckpt_meta(),
                                        cfg.keep_checkpoints)
                if last_ckpt:
                    cb.on_checkpoint(done, last_ckpt)
            if cfg.preview_every and done % cfg.preview_every == 0 and acc.is_main_process:
                cb.on_preview(done, preview(pipe, trainer, cfg, resolution))
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == total) and acc.is_main_process:
                cb.on_eval(done, trainer.export())
            request = control.poll()
            if request in ("pause", "cancel") and done < total:
                path = None
                if request == "pause" and ckpt_dir is not None:
                    path = _checkpoint(acc, ckpt_dir, done, ckpt_tensors, optimizer, rng, ckpt_meta(),
                                        cfg.keep_checkpoints)
                raise TrainingStopped("paused" if request == "pause" else "cancelled", done, path)
        if watch is not None:
            watch.restore_best(trainable)  # the best measured step's tensors (auto budget)
        concept = trainer.export()
        if probe is not None:
            gain = probe.gain(trainer)
            concept.metrics = dict(concept.metrics) | {"verdict": {
                "verdict": verdict(gain), "gain": round(gain, 4), "gain_start": round(gain_start, 4),
                "signal": "denoising gain of the concept prompt over the class prompt (trainers/probe.py)"}
                | ({"budget": watch.record(stopped_at or total)} if watch is not None else {})}
    finally:
        speed.close()
        if cfg.gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
    concept.train = asdict(cfg) | {"method": method, "base": base.spec, "processes": world,
                                   "final_loss": losses[-1] if losses else None}
    if hasattr(trainer, "record"):  # what the trainer measured or derived (initialisation, effective rates)
        concept.train |= trainer.record()
    concept.base = base.fingerprint()
    written = None
    if save and out_path is not None and acc.is_main_process:
        from studio.methods import save_concept

        if cfg.writes_folder():  # a whole model, written while the trained weights are in the pipeline
            written = trainer.save_model(out_path, concept)  # type: ignore[attr-defined]
        elif hasattr(trainer, "save_concepts"):  # one file per token (Break-A-Scene): the first file's path
            written = trainer.save_concepts(out_path, concept)
        else:
            written = save_concept(concept, out_path)
    acc.wait_for_everyone()
    return TrainResult(concept=concept, path=written, steps=stopped_at or total, seconds=time.monotonic() - t0,
                       losses=losses)


@dataclass
class _Fit:
    """The denoising loss of one UNet call."""

    unet: Any
    scheduler: Any
    prediction: str
    precision: Precision
    dtype: torch.dtype = field(init=False)  # the UNet's, read once: diffusers walks every module to find it

    def __post_init__(self) -> None:
        self.dtype = self.unet.dtype

    def per_sample(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss (B,) of clean ``latents`` (B, C, h, w) noised with ``noise`` at ``timesteps`` (B,):
        MSE against ε or v; the first ``len(mask)`` rows weighted by ``mask`` (M, 1, h, w) when given
        (the instance images; class images after them are unmasked)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        with self.precision.autocast():
            pred = self.unet(noisy.to(self.dtype), timesteps, cond.encoder_hidden_states,
                             added_cond_kwargs=cond.added_cond_kwargs).sample
        err = (pred.float() - target.float()) ** 2
        if mask is None:
            return err.mean(dim=(1, 2, 3))
        n = len(mask)
        per = (err[:n] * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * err.shape[1]).clamp(min=1e-6)
        return torch.cat([per, err[n:].mean(dim=(1, 2, 3))])


def _stepped(optimizer: Any, acc: Any) -> Any:
    """The optimizer the step path calls: the one ``accelerate`` wrapped, when its wrapper would only
    forward ``step`` / ``zero_grad`` to it — no loss scaler of its own (mixed precision is the run's own,
    :mod:`trainers.precision`), not on XLA, gradients always in sync (the loop accumulates itself) — after
    bookkeeping on every call (package look-ups, signature inspection) that on a small base costs more than
    the AdamW update. Otherwise the wrapper itself."""
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", None)
    if inner is None or getattr(optimizer, "scaler", None) is not None or acc.distributed_type == DistributedType.XLA:
        return optimizer
    return inner


def _all_finite(tensors: Any) -> bool:
    """True when no value of ``tensors`` (parameters of any shape) is NaN or ±inf: the largest magnitude
    over all of them (``torch.nn.utils.get_total_norm`` with ``inf``: one reduction per device and dtype,
    NaN propagating) is finite exactly then — one read of the device per step, not one per tensor.
    Integer tensors (run state) are always finite; empty ones have nothing to check."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=math.inf)))


def _rows(cond: Conditioning, rows: slice) -> Conditioning:
    """The conditioning of some rows of the batch."""
    added = {k: v[rows] for k, v in cond.added_cond_kwargs.items()} if cond.added_cond_kwargs is not None else None
    return Conditioning(cond.encoder_hidden_states[rows], added)


def _checkpoint(acc: Any, folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: Any,
                rng: torch.Generator, meta: dict[str, Any], keep: int) -> Path | None:
    path = None
    if acc.is_main_process:
        path = save_checkpoint(folder, step, trainable, optimizer, rng, meta, keep)
    acc.wait_for_everyone()
    return path


def _last_good(folder: Path | None) -> str:
    """"; the last good checkpoint is …" naming the newest checkpoint that verifies (intact, finite), or ""."""
    good = last_good_checkpoint(folder)
    return f"; the last good checkpoint is {good}" if good else ""


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
