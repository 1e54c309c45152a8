"""Textual-inversion training speed and memory: the studio loop vs a diffusers-example-style loop.

The reference trains the **whole** input-embedding matrix (restoring the old rows after every
step) and encodes the images with the VAE **every step**, as diffusers' textual_inversion.py
does; the studio trains an ``(n, D)`` parameter spliced into the embedding and encodes the images
once. Each variant runs in its own process so peak memory is its own.

    python bench/bench_ti.py                 # tiny base and an SD-1.5-sized random base at 256 px
    python bench/bench_ti.py --bases tiny    # quick
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


def _base(name: str):
    from bench.common import sd15_random
    from studio.models import load_base

    return sd15_random() if name == "sd15" else load_base(name, device="cpu")


def run_studio(base_name: str, images: Path, steps: int, resolution: int) -> dict:
    from trainers import get_trainer
    from trainers.loop import TrainCallbacks
    from trainers.runner import train

    class Clock(TrainCallbacks):
        times: list[float] = []

        def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
            self.times.append(time.perf_counter())

    base = _base(base_name)
    entry = get_trainer("textual-inversion")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = entry.resolve(images=str(images), out=f"{tmp}/c.safetensors", class_word="cat", steps=1,
                          batch_size=1, resolution=resolution, log_every=0)
        train(entry, cfg, base)  # warm-up (first-call allocations)
        cfg = entry.resolve(images=str(images), out=f"{tmp}/c.safetensors", class_word="cat", steps=steps,
                          batch_size=1, resolution=resolution, log_every=0)
        clock = Clock()
        t0 = time.perf_counter()
        train(entry, cfg, base, callbacks=clock)
        setup = clock.times[0] - t0  # data check, latent caching, initialisation + first step
    # steady state: steps 2..N (the cached latents are the point; setup is reported apart)
    return {"steps_per_s": (steps - 1) / (clock.times[-1] - clock.times[0]), "setup_s": setup}


def run_reference(base_name: str, images: Path, steps: int, resolution: int) -> dict:
    """diffusers-example style: full-matrix AdamW, VAE encode every step, restore frozen rows."""
    from diffusers import DDPMScheduler

    from trainers.data import load_image_folder

    base = _base(base_name)
    pipe = base.pipe
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    tok.add_tokens(["<cat>"])
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    new_id = tok.convert_tokens_to_ids("<cat>")
    emb = te.get_input_embeddings()
    with torch.no_grad():
        emb.weight[new_id] = emb.weight[tok.convert_tokens_to_ids("cat</w>")]
    orig = emb.weight.detach().clone()
    for p in list(unet.parameters()) + list(vae.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    emb.weight.requires_grad_(True)
    opt = torch.optim.AdamW([emb.weight], lr=5e-3, weight_decay=0.0)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    examples = load_image_folder(images, resolution)
    ids = tok(["a photo of <cat>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[new_id] = False
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        ex = examples[int(torch.randint(len(examples), (1,), generator=g))]
        latents = vae.encode(ex.pixels[None]).latent_dist.sample(g) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(sched.config.num_train_timesteps, (1,), generator=g)
        pred = unet(sched.add_noise(latents, noise, t), t, te(ids)[0]).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            emb.weight[keep] = orig[keep]

    step()
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        step()
    return {"steps_per_s": (steps - 1) / (time.perf_counter() - t0)}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    fn = run_studio if args.variant == "studio" else run_reference
    out = fn(args.base, Path(args.images), args.steps, args.resolution)
    from bench.common import peak_rss_mb

    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="tiny,sd15")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="studio")
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--images", default="")
    ap.add_argument("--resolution", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from bench.common import table, write_images

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "imgs", size=256)
        for base in args.bases.split(","):
            res = 256 if base == "sd15" else 32
            steps = args.steps if base == "sd15" else max(args.steps, 20)
            got = {}
            for variant in ("studio", "reference"):
                proc = subprocess.run([sys.executable, __file__, "--child", "--variant", variant, "--base", base,
                                       "--images", str(images), "--steps", str(steps), "--resolution", str(res),
                                       "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{variant} on {base} failed:\n{proc.stderr[-2000:]}")
                got[variant] = json.loads(line[0][7:])
                rows.append({"base": base, "loop": variant, "res": res, "steps": steps, **got[variant]})
            rows.append({"base": base, "loop": "studio/reference",
                         "steps_per_s": got["studio"]["steps_per_s"] / got["reference"]["steps_per_s"],
                         "peak_rss_mb": got["studio"]["peak_rss_mb"] / got["reference"]["peak_rss_mb"]})
    print(table(rows, ["base", "loop", "res", "steps", "steps_per_s", "peak_rss_mb", "setup_s"]))


if __name__ == "__main__":
    main()
