"""How much memory a training run needs, before it starts: ``python -m studio train METHOD …
--dry-run``, the UI's Train form (:func:`estimate_text`) and ``bench/memory_estimate.py``.

The model (README, "Memory"). The run's phases follow each other; its peak is the largest:

* ``encode``       = weights + trained + the VAE encoding the photos (2 images a call, no gradient); a photo
  is encoded when first drawn (:mod:`trainers.latents`), so — unless the probe encodes them all before
  step 1 and there are no class images — the optimizer state is counted here too;
* ``probe``        = weights + trained + the probe's no-gradient UNet passes (8 rows; also textual
  inversion's measured initialisation);
* ``class images`` = weights + DreamBooth generating its class images when they are not cached
  (a guided UNet pass of 2 × ``--class-batch-size`` rows, then the VAE decoding them; SDXL's pipeline
  decodes an fp16 VAE in float32);
* ``step``         = weights + trained + optimizer state + the step (text encoder(s), UNet forward
  and backward: the tensors saved for the backward, gradients in flight, parameter gradients as they
  appear);
* ``update``       = weights + trained + gradients + optimizer state + the optimizer's scratch;

plus the device's overhead (and, on CPU, where the device is the host, the host RAM: photos, cached
latents, a full fine-tune's backup of the base, the token table's tokenizer copies). **weights**:
every parameter and buffer of the UNet, VAE and text encoder(s) in the dtype they train in (and an
IP-Adapter's float32 image encoder), counted on the real modules or on meta copies built from the
configs. **trained**: the method's tensors, float32 (:mod:`trainers.memory_plans`). **gradients**:
one per trained value, same dtype. **optimizer state**: AdamW two float32 moments (8 B a value);
8-bit AdamW one byte each plus a float32 scale per 256 values for tensors of ≥ 4096 values (smaller
ones stay 32-bit); SGD none. **Activations** are not a formula: the step, the probe, the encoding
and the class images run on meta copies of the modules (:mod:`trainers.memory_trace`), which counts
every tensor they create and free at this resolution, batch, precision, attention kernel and
checkpointing — per UNet block, so the breakdown comes from the base's real structure.

Calibrated once against measured peaks (CPU RSS, ``bench/memory_estimate.py``; README):
:func:`onednn_workspace` (on CPU a convolution run through oneDNN copies its weight for every call;
found, then confirmed, by comparing traces with measurements), :data:`CPU_PROCESS_BYTES` (a process
with the libraries imported) and :data:`HOST_BOOKKEEPING_BYTES`. Not measurable on the machines that
built this (no GPU): the CUDA context and the allocator's slack (:data:`CUDA_CONTEXT_BYTES`,
:data:`CUDA_ALLOCATOR_SLACK`) are PyTorch's usual values, not measurements; cuDNN's workspace is
taken to be part of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.errors import StudioError
from trainers.entry import TrainerEntry
from trainers.memory_layout import BaseLayout, layout_of
from trainers.memory_plans import Plan, plan_for
from trainers.memory_trace import (
    META,
    StepSpec,
    Trace,
    cast_any,
    copy_module,
    meta_copy,
    quiet_cast,
    trace_forward,
    trace_step,
)

GIB = 1024**3
# Calibrated once on this repository's CPU machines (bench/memory_estimate.py; README "Memory"):
# a process with torch, diffusers, transformers and peft imported and one small pass run (measured
# 467-475 MiB: the check's process_mb), and, per text encoder, the token table's copies of the tokenizer
# and its vocabulary (the RSS growth of tiny-base runs at 32 px less their tensors: 52.7 MiB textual
# inversion, 40.5 MiB DreamBooth-LoRA; host RAM).
CPU_PROCESS_BYTES = 470 * 2**20
HOST_BOOKKEEPING_BYTES = 47 * 2**20
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context, cuBLAS/cuDNN handles and workspaces (not measured here)
CUDA_ALLOCATOR_SLACK = 0.10  # PyTorch's caching allocator: reserved beyond allocated (not measured here)
PROBE_ROWS = 8  # trainers.probe.DenoisingProbe's batch
EIGHT_BIT_MIN = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits
EIGHT_BIT_BLOCK = 256
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MemoryEstimate:
    """The estimate of one training run (bytes). ``phases``: the device memory of each phase
    (module docstring); ``total``: the peak phase + the device's overhead (+ host copies on CPU,
    where the device is the host)."""

    method: str
    base: str
    device: str
    resolution: int
    batch_size: int
    rows: int  # samples per UNet call: the batch, doubled by DreamBooth's prior preservation
    weights_dtype: str
    mixed_precision: str
    gradient_checkpointing: bool
    optimizer: str
    attention: str
    weights: int
    trainable_params: int
    trainable: int
    gradients: int
    optimizer_state: int
    activations: int
    text_encoder: int
    vae_encode: int
    probe: int
    class_images: int
    optimizer_temp: int
    extra_state: int
    host: int
    overhead: int
    phases: dict[str, int]
    blocks: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def total(self) -> int:
        return self.phases[self.peak_phase] + self.overhead + (self.host if self.device == "cpu" else 0)

    @property
    def training_bytes(self) -> int:
        """What training adds to a process that already holds the base: the total less the frozen
        weights and the device's overhead (on CPU: the RSS growth over a process with the base built)."""
        return self.total - self.weights - self.overhead

    def fits(self, gib: float) -> bool:
        """True when the total fits in ``gib`` GiB of device memory."""
        return self.total <= gib * GIB

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total": self.total, "peak_phase": self.peak_phase}


def estimate(entry_or_method: TrainerEntry | str, base: Any, cfg: Any = None, *,
             device: str | torch.device | None = None, weights_dtype: str | torch.dtype | None = None,
             attention: str = "sdpa", n_images: int | None = None, kernel_workspace: bool = True) -> MemoryEstimate:
    """Estimate the memory of training ``cfg`` (default: the trainer's defaults) on ``base``.

    Args:
        entry_or_method: a :class:`TrainerEntry`, or a trainer name (``dreambooth``, ``textual_inversion``…).
        base: a loaded base, a diffusers pipeline, a :class:`~trainers.memory_layout.BaseLayout`, or a
            spec (``sd15``, ``sdxl``, ``tiny``, a folder, a ``.safetensors`` file): see
            :func:`~trainers.memory_layout.layout_of`. Nothing is downloaded and no weights are read.
        device, weights_dtype: override the base's (for a spec: the best device; fp16 on a GPU, fp32 on CPU).
        attention: ``sdpa`` (memory-efficient kernels, the studio's default, xformers alike) or ``math``
            (the probability matrices are kept: heads × tokens² per attention).
        n_images: training photos (default: the image files in ``cfg.images``, if it is a folder).
        kernel_workspace: on CPU, count oneDNN's copy of each convolution's weight (the calibration
            term; ``False`` shows the estimate without it, as ``bench/memory_estimate.py`` does).
    """
    from trainers.registry import get_trainer

    entry = get_trainer(entry_or_method) if isinstance(entry_or_method, str) else entry_or_method
    cfg = cfg if cfg is not None else entry.resolve(class_word="subject")
    if attention not in ("sdpa", "math"):
        raise StudioError(f"attention must be sdpa or math, not {attention!r}.")
    layout = layout_of(base, device=device, dtype=weights_dtype)
    notes: list[str] = []
    dtype = layout.dtype
    if getattr(cfg, "full", False) and dtype != torch.float32:
        notes.append(f"a full fine-tune needs float32 weights (the trainer refuses {_dtype_name(dtype)}): load the "
                     "base with --dtype fp32; counted in float32")
        dtype = torch.float32
    resolution = int(cfg.resolution or layout.native_size)
    factor = layout.vae_factor
    if resolution % factor:
        raise StudioError(f"resolution {resolution} is not a multiple of the VAE's factor {factor}.")
    latent = (layout.latent_channels, resolution // factor, resolution // factor)
    autocast = AUTOCAST.get(cfg.mixed_precision)
    on_cpu = layout.device.type == "cpu"
    workspace = onednn_workspace if on_cpu and kernel_workspace else None

    unet = meta_copy(layout.unet, dtype)
    encoders = [meta_copy(te, dtype) for te in layout.text_encoders]
    vae = meta_copy(layout.vae, dtype)
    plan = plan_for(entry.cli_name, cfg, unet, encoders)
    notes += plan.notes

    encode = trace_forward(lambda: cast_any(vae).encode(torch.empty((2, 3, resolution, resolution), device=META,
                                                                      dtype=dtype)).latent_dist,
                           [vae], attention=attention, workspace=workspace)
    probe = _probe(unet, encoders, plan, latent, attention, autocast, layout.device.type, workspace) \
        if cfg.probe and plan.probe else Trace(0)
    classes = _class_images(unet, vae, encoders, plan, latent, attention, workspace)
    spec = StepSpec(rows=plan.rows, latent=latent, text=plan.text, text_rows=plan.text_rows,
                    image_tokens=plan.image_tokens, checkpointing=cfg.gradient_checkpointing, autocast=autocast,
                    attention=attention, device=layout.device.type)
    step = trace_step(unet, encoders, spec, adapter=plan.adapter, others=plan.adapter_modules, workspace=workspace)

    sizes = [p.numel() for p in plan.trainable]
    trainable = 4 * sum(sizes)
    state = optimizer_state(cfg.optimizer, sizes)
    temp = optimizer_temporaries(cfg.optimizer, sizes, layout.device.type)
    weights = _weights(layout, dtype) + plan.extra_weights - _bytes(dtype) * plan.base_trained
    persistent = weights + trainable + plan.extra_state
    # photos (and class images) are encoded when first drawn, beside the optimizer state, unless the probe
    # needs every photo before step 1 and no class image is drawn later (trainers.latents)
    lazy = not (cfg.probe and plan.probe) or bool(getattr(cfg, "prior_preservation", False))
    phases = {"encode": persistent + encode.peak + (state if lazy else 0), "step": persistent + state + step.peak,
              "update": persistent + trainable + state + temp}
    if probe.peak:
        phases["probe"] = persistent + probe.peak
    if classes.peak:  # before the trainer adds its tensors (a full fine-tune's are the base's own weights)
        phases["class images"] = persistent - (0 if plan.base_trained else trainable) + classes.peak
    host = plan.host + _data_bytes(cfg, resolution, latent, n_images) + \
        (HOST_BOOKKEEPING_BYTES * len(encoders) if plan.token_table else 0)
    peak = max(phases.values())
    overhead = CPU_PROCESS_BYTES if on_cpu else CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * peak)
    if getattr(cfg, "buckets", False):
        notes.append("with --buckets: estimated at the square size; buckets of about its area need about the same")
    if cfg.optimizer == "adamw8bit" and layout.device.type != "cuda":
        notes.append("8-bit AdamW needs bitsandbytes on a CUDA GPU")
    return MemoryEstimate(
        method=entry.cli_name + (" --full" if getattr(cfg, "full", False) else ""), base=layout.name,
        device=layout.device.type, resolution=resolution, batch_size=cfg.batch_size, rows=plan.rows,
        weights_dtype=_dtype_name(dtype), mixed_precision=cfg.mixed_precision,
        gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer, attention=attention,
        weights=weights, trainable_params=sum(sizes), trainable=trainable, gradients=trainable,
        optimizer_state=state, activations=step.peak - step.grads_at_peak, text_encoder=step.text,
        vae_encode=encode.peak, probe=probe.peak, class_images=classes.peak, optimizer_temp=temp,
        extra_state=plan.extra_state, host=host, overhead=overhead, phases=phases, blocks=step.blocks, notes=notes)


def optimizer_state(name: str, sizes: list[int]) -> int:
    """Bytes of the optimizer's state for trained tensors of ``sizes`` values (float32 parameters)."""
    if name == "adamw":
        return sum(8 * n for n in sizes)
    if name == "adamw8bit":
        return sum(2 * n + 8 * math.ceil(n / EIGHT_BIT_BLOCK) if n >= EIGHT_BIT_MIN else 8 * n for n in sizes)
    if name == "sgd":
        return 0
    raise StudioError(f"No memory model for the optimizer {name!r}; known: adamw, adamw8bit, sgd.")


def optimizer_temporaries(name: str, sizes: list[int], device: str) -> int:
    """The update's scratch memory: PyTorch's AdamW on CUDA updates every tensor at once (foreach:
    one float32 copy of all values); on CPU one tensor at a time (two copies of the largest);
    bitsandbytes updates in place."""
    if name != "adamw" or not sizes:
        return 0
    return 4 * sum(sizes) if device == "cuda" else 8 * max(sizes)


def onednn_workspace(func: Any, args: Any) -> int:
    """CPU: a convolution that PyTorch runs through oneDNN copies its weight into oneDNN's layout for
    each call, forward and backward (``aten.convolution(input, weight, bias, stride, padding,
    dilation, transposed, output_padding, groups)``, ``aten.convolution_backward(grad, input,
    weight, …, groups, mask)``). PyTorch picks oneDNN for half precision, and for float32 when
    the batch is above 1, the kernel above 3 × 3, the convolution grouped, or the input above
    20480 values (``ConvParams::use_mkldnn``); otherwise its own kernels copy no weight."""
    if func == torch.ops.aten.convolution.default:
        inp, weight, groups = args[0], args[1], args[8]
    elif func == torch.ops.aten.convolution_backward.default:
        inp, weight, groups = args[1], args[2], args[9]
    else:
        return 0
    onednn = inp.dtype != torch.float32 or groups > 1 or inp.shape[0] > 1 or inp.numel() > 20480 or \
        (weight.shape[-1] > 3 and weight.shape[-2] > 3)
    return int(weight.numel() * weight.element_size()) if onednn else 0


def _probe(unet: nn.Module, encoders: list[Any], plan: Plan, latent: tuple[int, int, int], attention: str,
           autocast: torch.dtype | None, device: str, workspace: Any) -> Trace:
    """The probe's no-gradient UNet passes: :data:`PROBE_ROWS` rows, conditioning given."""
    rows = PROBE_ROWS
    context = sum(int(te.config.hidden_size) for te in encoders)

    def run() -> Any:
        added = None
        if len(encoders) > 1:
            added = {"text_embeds": torch.empty((rows, _pooled_width(encoders)), device=META),
                     "time_ids": torch.zeros((rows, 6), device=META)}
        ehs = torch.empty((rows, 77, context), device=META, dtype=cast_any(unet).dtype)
        noisy = torch.empty((rows, *latent), device=META, dtype=cast_any(unet).dtype)
        return cast_any(unet)(noisy, torch.zeros(rows, dtype=torch.long, device=META), ehs,
                              added_cond_kwargs=added).sample

    return trace_forward(run, [unet, *plan.adapter_modules], attention=attention, autocast=autocast, device=device,
                         workspace=workspace)


def _class_images(unet: nn.Module, vae: nn.Module, encoders: list[Any], plan: Plan,
                  latent: tuple[int, int, int], attention: str, workspace: Any) -> Trace:
    """DreamBooth's class-image generation: a guided UNet pass (2 × the call's images), then the VAE decoding."""
    n = plan.class_images
    if not n:
        return Trace(0)
    context = sum(int(te.config.hidden_size) for te in encoders)
    dtype = cast_any(unet).dtype
    # SDXL's pipeline (not SD 1/2's) decodes an fp16 VAE in float32 when its config says force_upcast (weights too)
    upcast = len(encoders) > 1 and dtype == torch.float16 and bool(getattr(cast_any(vae).config, "force_upcast", False))
    decoder: Any = quiet_cast(copy_module(vae), torch.float32) if upcast else vae

    def run() -> Any:
        added = None
        if len(encoders) > 1:
            added = {"text_embeds": torch.empty((2 * n, _pooled_width(encoders)), device=META, dtype=dtype),
                     "time_ids": torch.zeros((2 * n, 6), device=META, dtype=dtype)}
        ehs = torch.empty((2 * n, 77, context), device=META, dtype=dtype)
        pred = cast_any(unet)(torch.empty((2 * n, *latent), device=META, dtype=dtype),
                              torch.zeros(2 * n, dtype=torch.long, device=META), ehs, added_cond_kwargs=added).sample
        del pred, ehs
        return cast_any(decoder).decode(torch.empty((n, *latent), device=META, dtype=decoder.dtype)).sample

    trace = trace_forward(run, [unet, vae, decoder], attention=attention, workspace=workspace)
    if upcast:  # the float32 copy of the VAE's weights replaces the fp16 ones while it decodes
        trace.peak += sum(p.numel() * 2 for p in vae.parameters())
    return trace


def _pooled_width(encoders: list[Any]) -> int:
    last = encoders[-1]
    return int(getattr(last.config, "projection_dim", last.config.hidden_size))


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _weights(layout: BaseLayout, dtype: torch.dtype) -> int:
    """Every parameter and buffer of the base's modules: floating ones in ``dtype``, others as they are."""
    seen: set[int] = set()
    total = 0
    for m in layout.modules:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * (_bytes(dtype) if t.is_floating_point() else t.element_size())
    return total


def _data_bytes(cfg: Any, resolution: int, latent: tuple[int, int, int], n_images: int | None) -> int:
    """Host RAM of the photos (float32 pixels) and their cached latents (mean and std, image and mirror)."""
    count = n_images if n_images is not None else _count_images(cfg.images)
    if getattr(cfg, "prior_preservation", False):
        count += _count_images(cfg.class_images) if cfg.class_images else cfg.num_class_images
    c, h, w = latent
    return count * (4 * 3 * resolution * resolution + 4 * 2 * 2 * c * h * w)


def _count_images(folder: str | None) -> int:
    if not folder or not Path(folder).expanduser().is_dir():
        return 0
    return sum(1 for p in Path(folder).expanduser().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
               and not p.name.endswith(".mask.png"))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


# -- text -------------------------------------------------------------------------------------------------
def human(n: float) -> str:
    """Bytes as GiB / MiB / KiB with 3 significant digits."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def count(n: int) -> str:
    """A parameter count: 64, 1.59 M, 2.57 G."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def table_rows(est: MemoryEstimate) -> list[tuple[str, str]]:
    """(what, how much) rows of the estimate, in the order of the markdown table."""
    opt = {"adamw": "AdamW: 2 × fp32", "adamw8bit": "8-bit AdamW", "sgd": "SGD"}.get(est.optimizer, est.optimizer)
    precision = est.weights_dtype + (f", autocast {est.mixed_precision}" if est.mixed_precision != "no" else "")
    rows = [
        (f"frozen weights (UNet, VAE, text encoder(s); {precision})", human(est.weights)),
        (f"trained parameters ({count(est.trainable_params)}, fp32)", human(est.trainable)),
        ("gradients", human(est.gradients)),
        (f"optimizer state ({opt})", human(est.optimizer_state)),
        (f"activations (forward + backward, {est.rows} × {est.resolution} px"
         f"{', checkpointed' if est.gradient_checkpointing else ''})", human(est.activations)),
        ("  of which text encoder(s)", human(est.text_encoder)),
        ("encoding the photos (VAE, each when first drawn)", human(est.vae_encode)),
    ]
    if est.probe:
        rows.append((f"probe (no gradient, {PROBE_ROWS} rows)", human(est.probe)))
    if est.class_images:
        rows.append(("generating class images (if not cached)", human(est.class_images)))
    if est.extra_state:
        rows.append(("other state the trainer keeps", human(est.extra_state)))
    if est.host:
        rows.append(("host RAM: photos, latents, tokenizer copies" + (", base backup" if "--full" in est.method
                                                                       else ""), human(est.host)))
    where = "process baseline" if est.device == "cpu" else "CUDA context + allocator"
    rows.append((f"device overhead ({where})", human(est.overhead)))
    rows.append((f"**total (peak: {est.peak_phase})**", f"**{human(est.total)}**"))
    return rows


def markdown(est: MemoryEstimate) -> str:
    """The estimate as a markdown table with a fits line and notes."""
    lines = [f"Memory estimate: {est.method} on {est.base} ({est.device}), {est.resolution} px, batch "
             f"{est.batch_size}", "", "| | |", "|---|---:|"]
    lines += [f"| {what} | {amount} |" for what, amount in table_rows(est)]
    fits = ", ".join(f"{g} GiB: {'fits' if est.fits(g) else 'does not fit'}" for g in (8, 12, 16, 24, 48))
    lines += ["", f"{fits}."]
    blocks = [(k, v) for k, v in est.blocks.items() if v >= 0.01 * max(est.blocks.values(), default=1)]
    if blocks:  # what the traced forward left for the backward, block by block (the breakdown of "activations")
        lines += ["", "Saved for the backward, by UNet block: " + ", ".join(
            f"{'between blocks' if k in ('unet', 'other') else k} {human(v)}" for k, v in blocks) + "."]
    lines += [f"- {note}" for note in est.notes]
    return "\n".join(lines)


def estimate_text(entry: TrainerEntry | str, base: Any, cfg: Any = None, **kwargs: Any) -> str:
    """:func:`estimate` as a markdown table (the UI's Train form shows it)."""
    return markdown(estimate(entry, base, cfg, **kwargs))


def config_summary(entry: TrainerEntry, cfg: Any) -> str:
    """``field: value`` lines of a resolved config (what ``--dry-run`` would train)."""
    values = asdict(cfg)
    width = max(len(k) for k in values)
    return "\n".join([f"{entry.cli_name} ({type(cfg).__name__})"] + [f"  {k.ljust(width)}  {v!r}"
                                                                    for k, v in values.items()])
