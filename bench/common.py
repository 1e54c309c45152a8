"""Benchmark helpers: build bases from config, time steps, measure peak memory in a subprocess."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "studio" / "models" / "configs"


def sd15_random(seed: int = 0) -> Any:
    """An SD-1.5-sized pipeline (UNet 860M, CLIP-L 123M, VAE 84M) with random weights, fp32 CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.models import describe
    from studio.models.tiny import load_clip_tokenizer

    torch.manual_seed(seed)
    root = CONFIGS / "sd1"
    unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((root / "vae" / "config.json").read_text()))
    te_cfg = {k: v for k, v in json.loads((root / "text_encoder" / "config.json").read_text()).items()
              if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype")}
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    sched = DDPMScheduler.from_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return describe(pipe, spec="sd15-random", name="sd15-random", identity="bench:sd15-random",
                    device=torch.device("cpu"), dtype=torch.float32)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def write_images(folder: Path, n: int = 4, size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (200, 60 + 30 * i, 60))
        ImageDraw.Draw(im).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=(30, 30, 200))
        im.save(folder / f"{i}.png")
    return folder
