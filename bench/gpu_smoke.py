"""GPU smoke test: every trainer and generation at real SD 1.5 and SDXL sizes, random weights, fp16/bf16.

Builds each pipeline from the configs shipped in ``studio/models/configs/`` directly on the device
(random weights: nothing is downloaded, the numbers are about speed and memory, not images), loads
its weights in the low precision (the frozen weights) and trains under autocast of the same
precision — the recipe of ``trainers/precision.py``. For every case it prints seconds per step
(the slope after the first step, so warm-up and one-time work are left out) and the peak GPU memory
(``torch.cuda.max_memory_reserved`` + the CUDA context), then which cases fit 8, 12 and 24 GB cards.

Cases, per family: each trainer (textual inversion, DreamBooth-LoRA with prior preservation, NeTI,
Perfusion, IP-Adapter fine-tune) plain and with ``--gradient-checkpointing``; generation at the
native size (plain, with a LoRA fused, with the LoRA as PEFT adapters) and at twice the size with
``--vae-tiling``.

    python bench/gpu_smoke.py                          # CUDA: SD 1.5 and SDXL, bf16 (fp16 without bf16)
    python bench/gpu_smoke.py --family sd15 --precision fp16 --steps 8
    python bench/gpu_smoke.py --tiny --device cpu      # the same code on the tiny bases (what CI runs)

Without CUDA and without ``--tiny`` it refuses in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/gpu_smoke.py` from the repository root
    sys.path.insert(0, str(REPO))

CONFIGS = REPO / "studio" / "models" / "configs"
FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}  # smoke name → shipped config folder
TINY = {"sd15": "tiny", "sdxl": "tiny-sdxl"}
TRAINERS = ("textual-inversion", "dreambooth", "neti", "perfusion", "adapter")
BUDGETS_GB = (8, 12, 24)
CUDA_CONTEXT_GB = 0.5  # the CUDA context and cuBLAS/cuDNN workspaces, outside PyTorch's allocator


# -- building bases ---------------------------------------------------------------------------------
def _config(folder: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(folder.read_text()).items()
            if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}


def random_base(family: str, device: torch.device, dtype: torch.dtype, *, tiny: bool = False, seed: int = 0) -> Any:
    """A :class:`~studio.models.BaseModel` of ``family`` (``sd15`` / ``sdxl``) with random weights, built on
    ``device`` from the shipped configs (``tiny``: the tiny base of that family instead), weights in ``dtype``."""
    from studio.models import describe

    torch.manual_seed(seed)
    if tiny:
        from studio.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(TINY[family])
    else:
        pipe = _pipeline_from_configs(CONFIGS / FAMILIES[family], device)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device=device, dtype=dtype)
    return describe(pipe, spec=f"random-{family}", name=f"random-{family}" + ("-tiny" if tiny else ""),
                    identity=f"bench:random-{family}{'-tiny' if tiny else ''}:seed{seed}", device=device, dtype=dtype)


def _pipeline_from_configs(root: Path, device: torch.device) -> Any:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models.tiny import load_clip_tokenizer

    with torch.device(device):  # random initialisation on the GPU: seconds instead of minutes on a CPU
        unet = UNet2DConditionModel.from_config(_config(root / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_config(root / "vae" / "config.json"))
        te = CLIPTextModel(CLIPTextConfig(**_config(root / "text_encoder" / "config.json")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config(root / "text_encoder_2" / "config.json"))) \
            if (root / "text_encoder_2").is_dir() else None
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    sched = EulerDiscreteScheduler.from_config(sched_cfg)  # sampling; training takes DDPM from the same config
    if te2 is None:
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer(), unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=load_clip_tokenizer(),
                                     tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)


def _image_encoder(folder: Path, size: int) -> Path:
    """A small random CLIP image encoder (frozen; it encodes each photo once, so its size is no part of a step)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=size, patch_size=size // 4)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    return folder


def _photos(folder: Path, n: int, size: int) -> Path:
    from bench.common import write_images

    return write_images(folder, n=n, size=size)


# -- measuring ----------------------------------------------------------------------------------------
class _Memory:
    """Peak memory of one case: the CUDA allocator's reserved peak (+ context), or on a CPU the process's RSS."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        yield out
        if self.cuda:
            torch.cuda.synchronize()
            out["peak_gb"] = torch.cuda.max_memory_reserved() / 2**30 + CUDA_CONTEXT_GB
        else:
            import resource

            out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak so far


def fits(peak_gb: float | None) -> str:
    """The smallest of the 8/12/24 GB budgets the case fits in, or ``>24``."""
    if peak_gb is None:
        return "-"
    return next((f"{b} GB" for b in BUDGETS_GB if peak_gb <= b), f">{BUDGETS_GB[-1]} GB")


def train_case(base: Any, trainer: str, *, precision: str, steps: int, work: Path, checkpointing: bool,
               memory: _Memory) -> dict[str, Any]:
    """Train ``steps`` steps of ``trainer``; seconds per step from the step times after the first."""
    from trainers import get_trainer
    from trainers.loop import TrainCallbacks
    from trainers.runner import train

    entry = get_trainer(trainer)
    size = base.native_size
    extra: dict[str, Any] = {
        "dreambooth": dict(prior_preservation=True, num_class_images=2, class_steps=2, class_batch_size=1,
                           class_cache_dir=str(work / "class_images")),
        "adapter": dict(adapter="new", image_encoder=str(work / "encoder"), save_image_encoder=False),
    }.get(trainer, {})
    out = work / (f"{trainer}-{base.family}" + ("" if trainer == "adapter" else ".safetensors"))
    cfg = entry.resolve(images=str(work / "photos"), out=str(out), steps=steps, batch_size=1, grad_accum=1,
                        seed=0, probe=False, budget="fixed", log_every=0, class_word="dog",
                        mixed_precision=precision, gradient_checkpointing=checkpointing, **extra)
    times: list[float] = []

    class Clock(TrainCallbacks):
        def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
            times.append(seconds)

    with memory.measure() as mem:
        result = train(entry, cfg, base, callbacks=Clock())
    slope = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"case": trainer + (" +gc" if checkpointing else ""), "s/step": slope, "peak GB": mem["peak_gb"],
            "loss": result.losses[-1], "size": size}


def generate_case(base: Any, label: str, *, steps: int, size: int, memory: _Memory, concepts: list[Any],
                  **options: Any) -> dict[str, Any]:
    """Seconds per sampling step from two step counts (``steps`` and ``2 × steps``): the slope leaves out the
    text encoding, the VAE decode and applying/removing concepts."""
    from studio.generation import GenerateConfig, generate

    prompt = "a photo of a dog" + (" <smoke>" if concepts else "")
    timings = []
    with memory.measure() as mem:
        for n in (steps, 2 * steps):
            cfg = GenerateConfig(prompt=prompt, steps=n, guidance=5.0, width=size, height=size, **options)
            generate(base, cfg, [(c, 1.0, "smoke") for c in concepts])  # warm (allocations, kernels)
            if base.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            generate(base, cfg, [(c, 1.0, "smoke") for c in concepts])
            if base.device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - t)
    return {"case": label, "s/step": (timings[1] - timings[0]) / steps, "peak GB": mem["peak_gb"], "size": size}


def smoke_lora(base: Any) -> Any:
    """A rank-8 random LoRA on the UNet's attention projections and the text encoders' (as DreamBooth trains)."""
    from studio.concept import Concept
    from studio.methods.lora.keys import TE_PREFIXES, UNET_PREFIX, LoraModule, kohya_name, kohya_tensors, te_path
    from studio.methods.runtime import text_encoders

    g = torch.Generator().manual_seed(1)
    modules = {}
    parts = [(UNET_PREFIX, base.pipe.unet, ("to_q", "to_k", "to_v", "to_out.0"))]
    encoders = [te for _, te in text_encoders(base.pipe)]
    parts += [(p, te, ("q_proj", "k_proj", "v_proj", "out_proj")) for p, te in zip(TE_PREFIXES[len(encoders)], encoders)]
    for prefix, model, targets in parts:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(targets):
                path = name if prefix == UNET_PREFIX else te_path(name)
                modules[kohya_name(prefix, path)] = LoraModule(
                    down=torch.randn(8, mod.in_features, generator=g) * 0.01,
                    up=torch.randn(mod.out_features, 8, generator=g) * 0.01, alpha=8.0)
    return Concept(method="lora", tokens=["<smoke>"], tensors=kohya_tensors(modules), class_word="dog", name="smoke")


# -- the run ------------------------------------------------------------------------------------------
def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(ns.device)
    precision = ns.precision or ("bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    memory = _Memory(device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as tmp:
        os.environ.setdefault("STUDIO_PERFUSION_CACHE", str(Path(tmp) / "perfusion"))
        for family in ns.family:
            t0 = time.perf_counter()
            base = random_base(family, device, dtype, tiny=ns.tiny)
            build_s = time.perf_counter() - t0
            print(f"# {family}: {base.name} built on {device} in {precision} in {build_s:.1f} s, "
                  f"native {base.native_size} px", flush=True)
            work = Path(tmp) / family
            _photos(work / "photos", 2, base.native_size)
            _image_encoder(work / "encoder", 32 if ns.tiny else 224)
            for trainer in ns.trainers:
                for checkpointing in (False, True) if ns.checkpointing else (False,):
                    row = train_case(base, trainer, precision=precision, steps=ns.steps, work=work,
                                     checkpointing=checkpointing, memory=memory)
                    rows.append({"family": family, "precision": precision, **row,
                                 "fits": fits(row["peak GB"]) if memory.cuda else "-"})
                    _print_row(rows[-1])
            if ns.generate:
                lora = smoke_lora(base)
                native = base.native_size
                cases = [("generate", native, [], {}),
                         ("generate +LoRA fused", native, [lora], {"fuse_lora": True}),
                         ("generate +LoRA PEFT", native, [lora], {"fuse_lora": False}),
                         (f"generate {2 * native}px +vae-tiling", 2 * native, [], {"vae_tiling": True})]
                for label, size, concepts, options in cases:
                    row = generate_case(base, label, steps=ns.gen_steps, size=size, memory=memory,
                                        concepts=concepts, **options)
                    rows.append({"family": family, "precision": precision, **row,
                                 "fits": fits(row["peak GB"]) if memory.cuda else "-"})
                    _print_row(rows[-1])
            del base
            gc.collect()
    return rows


COLUMNS = ["family", "case", "precision", "size", "s/step", "peak GB", "fits"]


def _print_row(row: dict[str, Any]) -> None:
    s = row.get("s/step")
    print(f"{row['family']:5s} {row['case']:32s} {row['precision']:4s} {row['size']:5d}px "
          f"{'-' if s is None else f'{s:.4f}'} s/step  peak {row['peak GB']:.2f} GB  fits {row['fits']}", flush=True)


def summary(rows: list[dict[str, Any]], device: torch.device) -> str:
    from bench.common import table

    lines = [table(rows, COLUMNS)]
    if device.type != "cuda":
        lines.append("(CPU: 'peak GB' is the process's peak RSS so far, not a per-case GPU peak; 'fits' is "
                     "meaningless here)")
        return "\n".join(lines)
    for budget in BUDGETS_GB:
        ok = [f"{r['family']} {r['case']}" for r in rows if r["peak GB"] <= budget]
        lines.append(f"fits {budget} GB: " + (", ".join(ok) if ok else "nothing"))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp16", "bf16"], default=None,
                   help="weights and autocast dtype (default: bf16 where supported, else fp16)")
    p.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--trainers", nargs="*", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per training case (s/step: after the first)")
    p.add_argument("--gen-steps", type=int, default=4, help="sampling steps (the slope uses this and twice this)")
    p.add_argument("--no-generate", dest="generate", action="store_false")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="leave out the --gradient-checkpointing variant of each trainer")
    p.add_argument("--tiny", action="store_true", help="the tiny bases of each family instead (a CPU check of the "
                   "same code path)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ns = p.parse_args(argv)
    if ns.steps < 2 or ns.gen_steps < 1:
        p.error("--steps must be at least 2 (the slope needs two steps) and --gen-steps at least 1")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but CUDA is not available; run with --tiny --device cpu to check the code "
              "path on a CPU.", file=sys.stderr)
        return 2
    if device.type != "cuda" and not ns.tiny:
        print(f"gpu_smoke: SD 1.5 / SDXL sizes need a CUDA GPU ({device.type} given); run with --tiny --device "
              f"{device.type} to check the code path on the tiny bases.", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # the tiny models gain nothing from more (tests/conftest.py)
    rows = run(ns)
    print(summary(rows, device))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
