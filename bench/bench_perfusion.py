"""Perfusion cost: the added time per denoising step, and training steps per second.

**Per denoising step** — one UNet forward on a classifier-free-guidance batch (2 rows: negative,
prompt) at a fixed timestep, on the same text context, for:

* **plain** — the base's own processors (PyTorch SDPA), no concept;
* **studio processor, no-op hook** — the shared studio processor alone (what any hook-based method
  pays before its own work);
* **perfusion ×1 / ×3** — one or three Perfusion concepts applied (the studio processor on every
  cross-attention layer, K and V edited on the conditional row, key locking through ``to_k``);
* **perfusion ×1 exact** — three concepts with the exact (Appendix B) orthogonal term;
* **perfusion global** — one concept with global key locking (keys from the superclass prompt).

Variants are interleaved and repeated; the table gives the median wall time and the median CPU
time of this process (with one torch thread, CPU time is the compute cost even when other jobs
share the machine) and the overhead over plain. Target: ≤ 10 % per step.

**Training** — optimizer steps per second of the Perfusion trainer (``cpu`` preset settings,
batch 4) and, for comparison, textual inversion with the same batch, on the tiny base
(``--train-sd15`` adds the SD-1.5-sized random base at 64 px, batch 1).

    python bench/bench_perfusion.py                    # tiny + SD-1.5-sized random UNet at 256 px
    python bench/bench_perfusion.py --bases tiny --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _base(name: str) -> Any:
    from bench.common import sd15_random
    from studio.models import load_base

    return sd15_random() if name == "sd15" else load_base(name, device="cpu")


def random_concept(base: Any, trigger: str, seed: int) -> Any:
    """A Perfusion concept with random embedding / value targets and its real ``i*``."""
    from studio.concept import Concept
    from studio.methods.attention import unet_layers
    from studio.methods.perfusion import concept_meta, concept_tensors
    from studio.methods.perfusion.covariance import token_encoding, word_encoding
    from studio.methods.runtime import text_encoders

    g = torch.Generator().manual_seed(seed)
    embeddings = [torch.randn(te.config.hidden_size, generator=g) for _, te in text_encoders(base.pipe)]
    i_star = token_encoding(base.pipe, trigger, embeddings, [f"a photo of {trigger}"])
    i_super = word_encoding(base.pipe, "dog", ["a photo of a dog"])
    v = [torch.randn(layer.inner_dim, generator=g) for layer in unet_layers(base.pipe.unet)]
    return Concept(method="perfusion", tokens=[trigger], class_word="dog", name=trigger.strip("<>"),
                   tensors=concept_tensors(v_targets=v, i_star=i_star, i_super=i_super, embeddings=embeddings),
                   meta=concept_meta())


def step_costs(base_name: str, size: int | None, repeats: int, n_captions: int | None) -> list[dict[str, Any]]:
    from bench.common import table
    from studio.methods import get_method
    from studio.methods.attention import AttentionHook, add_hook, cfg_layout, remove_hook
    from studio.methods.perfusion.covariance import CovarianceSettings

    base = _base(base_name)
    pipe, unet = base.pipe, base.pipe.unet
    size = size or base.native_size
    latent = size // int(pipe.vae_scale_factor)
    cov = CovarianceSettings(n_captions=n_captions)
    concepts = [random_concept(base, f"<pf{i}>", i) for i in range(3)]
    sample = torch.randn(2, int(unet.config.in_channels), latent, latent, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)

    sdxl = getattr(pipe, "text_encoder_2", None) is not None

    def context(prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``[negative; prompt]`` states (2, 77, D) and SDXL's added conditioning."""
        with torch.no_grad():
            out = pipe.encode_prompt(prompt, device=unet.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=True, negative_prompt="")
        if not sdxl:
            return torch.cat([out[1], out[0]]), None
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=out[0].dtype)
        return torch.cat([out[1], out[0]]), {"text_embeds": torch.cat([out[3], out[2]]), "time_ids": time_ids}

    def run(cond: tuple[torch.Tensor, dict[str, torch.Tensor] | None]) -> None:
        with torch.no_grad(), cfg_layout(unet, guided=True):
            unet(sample, t, cond[0], added_cond_kwargs=cond[1])

    variants: dict[str, tuple[list[Any], dict[str, Any]]] = {
        "plain": ([], {}),
        "studio processor, no-op hook": ([], {"noop": True}),
        "perfusion x1": (concepts[:1], {}),
        "perfusion x3": (concepts, {}),
        "perfusion x3 exact": (concepts, {"orthogonal": "exact"}),
        "perfusion global": (concepts[:1], {"locking": "global"}),
    }
    method = get_method("perfusion")
    # warm the C⁻¹ cache (not part of a step)
    method.apply(base, concepts[0], strength=1.0, covariance=cov).remove()
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 1):
        for name, (cs, opts) in variants.items():
            if opts.get("noop"):
                add_hook(unet, "bench-noop", AttentionHook())
            handles = [method.apply(base, c, strength=1.0, covariance=cov, **opts) for c in cs]
            try:
                prompt = "a photo of " + " and ".join(c.trigger for c in cs) if cs else "a photo of a dog"
                ctx = context(prompt)
                w0, c0 = time.perf_counter(), time.process_time()
                run(ctx)
                if r:  # the first round warms up
                    walls[name].append(time.perf_counter() - w0)
                    cpus[name].append(time.process_time() - c0)
            finally:
                for h in handles:
                    h.remove()
                if opts.get("noop"):
                    remove_hook(unet, "bench-noop")
    plain_wall, plain_cpu = statistics.median(walls["plain"]), statistics.median(cpus["plain"])
    rows = []
    for name in variants:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        rows.append({"base": base_name, "latent": f"{latent}x{latent}", "variant": name, "wall ms": 1000 * wall,
                     "cpu ms": 1000 * cpu, "overhead wall %": 100 * (wall / plain_wall - 1),
                     "overhead cpu %": 100 * (cpu / plain_cpu - 1)})
    print(table(rows, list(rows[0])), flush=True)
    return rows


def train_rate(base_name: str, steps: int, batch: int, resolution: int | None) -> list[dict[str, Any]]:
    from bench.common import table, write_images
    from trainers.loop import run_training
    from trainers.perfusion import PerfusionConfig, PerfusionTrainer
    from trainers.textual_inversion import TextualInversionConfig, TextualInversionTrainer

    base = _base(base_name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "imgs", n=4, size=resolution or base.native_size)
        common = dict(images=str(images), class_word="dog", batch_size=batch, log_every=0, resolution=resolution)
        for name, make in (
            ("perfusion", lambda s: PerfusionTrainer(base, PerfusionConfig(steps=s, **common), "<pf>")),
            ("textual_inversion", lambda s: TextualInversionTrainer(
                base, TextualInversionConfig(steps=s, num_vectors=1, **common), "<ti>")),
        ):
            warm = make(1)
            run_training(base, warm, warm.cfg, method=name, save=False)
            trainer = make(steps)
            w0, c0 = time.perf_counter(), time.process_time()
            run_training(base, trainer, trainer.cfg, method=name, save=False)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            rows.append({"base": base_name, "trainer": name, "batch": batch, "steps": steps,
                         "steps/s (wall)": steps / wall, "steps/s (cpu)": steps / cpu})
    print(table(rows, list(rows[0])), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="tiny,sd15", help="comma-separated: tiny, tiny-v, tiny-sdxl, sd15")
    ap.add_argument("--sd15-size", type=int, default=256, help="pixel size for the SD-1.5-sized UNet")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds (default: 30 tiny, 5 sd15)")
    ap.add_argument("--captions", type=int, default=500,
                    help="corpus size for C⁻¹ here (the cost per step does not depend on it)")
    ap.add_argument("--train-steps", type=int, default=10, help="0 skips the training timing")
    ap.add_argument("--train-sd15", action="store_true", help="also time training on the SD-1.5-sized base")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in filter(None, args.bases.split(",")):
        size = args.sd15_size if name == "sd15" else None
        step_costs(name, size, args.repeats or (5 if name == "sd15" else 30), args.captions)
    if args.train_steps:
        train_rate("tiny", args.train_steps, 4, None)
    if args.train_sd15:
        train_rate("sd15", 2, 1, 64)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
