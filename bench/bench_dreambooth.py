"""DreamBooth training speed and memory on CPU: LoRA vs full fine-tune, tiny base vs SD-1.5 size.

Each row trains with prior preservation (one instance + one class image per step, class images
from a folder so nothing is generated), text embeddings cached, in its own process so that peak
memory is its own. ``steps/s`` is the steady state (steps 2..N); ``setup_s`` is everything before
the first step ends (image check, latent caching, adapters, the full fine-tune's CPU backup of the
base). ``base_mb`` is the process after building the base, ``peak_mb`` its peak during training.

The SD-1.5 full fine-tune needs about 5 × 3.4 GB (weights, gradients, two AdamW moments and the
backup that restores the base afterwards) + the VAE and text encoder ≈ 18 GB, and minutes per
step on a CPU, so it runs only with ``--sd15-full`` (and enough free memory).

    python bench/bench_dreambooth.py                  # tiny LoRA/full + SD-1.5-size LoRA at 128 px (~2 min)
    python bench/bench_dreambooth.py --sd15-full      # + the SD-1.5-size full fine-tune (~18 GB, ~6 min)
    python bench/bench_dreambooth.py --bases tiny     # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1024**3


def _base(name: str):
    from bench.common import sd15_random
    from studio.models import load_base

    return sd15_random() if name == "sd15" else load_base(name, device="cpu")


def full_finetune_bytes(unet_params: int) -> int:
    """Weights + gradients + AdamW's two moments + the CPU backup, fp32: 5 × 4 bytes per parameter."""
    return 5 * 4 * unet_params


def run(base_name: str, mode: str, images: Path, steps: int, resolution: int) -> dict:
    import psutil

    from trainers import get_trainer
    from trainers.loop import TrainCallbacks
    from trainers.runner import train

    class Clock(TrainCallbacks):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
            self.times.append(time.perf_counter())

    base = _base(base_name)
    base_mb = psutil.Process().memory_info().rss / 2**20
    entry = get_trainer("dreambooth")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/model" if mode == "full" else f"{tmp}/c.safetensors"
        cfg = entry.resolve(images=str(images), out=out, class_word="dog", steps=steps, resolution=resolution,
                          full=mode == "full", class_images=str(images), log_every=0)
        clock = Clock()
        t0 = time.perf_counter()
        result = train(entry, cfg, base, callbacks=clock)
        size = None if mode == "full" else Path(out).stat().st_size / 2**20
    trained = base.pipe.unet.parameters() if mode == "full" else result.concept.tensors.values()
    return {"steps_per_s": (steps - 1) / (clock.times[-1] - clock.times[0]), "setup_s": clock.times[0] - t0,
            "base_mb": base_mb, "file_mb": size, "trainable_m": sum(t.numel() for t in trained) / 1e6}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = run(args.base, args.mode, Path(args.images), args.steps, args.resolution)
    from bench.common import peak_rss_mb

    out["peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


def main() -> None:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="tiny,sd15")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=3, help="steps on the SD-1.5-sized base (tiny: at least 20)")
    ap.add_argument("--resolution", type=int, default=128, help="training resolution on the SD-1.5-sized base")
    ap.add_argument("--sd15-full", action="store_true", help="also fine-tune the SD-1.5-sized UNet fully (~18 GB)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable numbers on a shared CPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--images", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from bench.common import table, write_images

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "imgs", n=2, size=args.resolution)
        for base in args.bases.split(","):
            res = args.resolution if base == "sd15" else 32
            steps = args.steps if base == "sd15" else max(args.steps, 20)
            for mode in args.modes.split(","):
                row = {"base": base, "mode": mode, "res": res, "steps": steps}
                if base == "sd15" and mode == "full":
                    need = full_finetune_bytes(859_520_964) + 1.5 * GB  # UNet params + VAE, text encoder, activations
                    have = psutil.virtual_memory().available
                    if not args.sd15_full or have < need * 1.1:
                        why = "add --sd15-full" if not args.sd15_full else f"{have / GB:.0f} GB free"
                        rows.append(row | {"note": f"skipped ({why}): needs ≈{need / GB:.0f} GB RAM"})
                        continue
                cmd = [sys.executable, __file__, "--child", "--base", base, "--mode", mode, "--images", str(images),
                       "--steps", str(steps), "--resolution", str(res), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{mode} on {base} failed:\n{proc.stderr[-2000:]}")
                rows.append(row | json.loads(line[0][7:]))
    print(table(rows, ["base", "mode", "res", "steps", "steps_per_s", "setup_s", "trainable_m", "file_mb",
                       "base_mb", "peak_mb", "note"]))


if __name__ == "__main__":
    main()
