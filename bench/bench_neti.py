"""NeTI sampling cost: the plain pipeline vs the studio's NeTI vs a reference-style loop.

* **plain** — the pipeline with the class word ("a photo of a cat"), no concept;
* **studio** — a NeTI concept applied (:mod:`studio.methods.neti`): per step one batched
  text-encoder pass for all ``L`` layers (first image; later images of the same prompt read the
  per-timestep cache), classifier-free guidance in one batched UNet pass;
* **reference-style** — what the official code does at inference: per step the mapper and the text
  encoder run once **per layer** (``L`` separate passes), and the unconditional and conditional
  UNet passes run one after the other.

Two tables: whole images (prompt encoding, denoising, VAE decode), and the per-step components
(UNet batched vs two passes; text work batched vs per layer) from which the per-step ratios follow
at any resolution. Times are the fastest of ``--images`` repeats, in wall and **CPU seconds** (one
torch thread by default: on a shared machine the CPU time is the stable number).

    python bench/bench_neti.py                       # tiny and an SD-1.5-sized random base
    python bench/bench_neti.py --bases tiny --steps 10
    python bench/bench_neti.py --bases sd15 --no-images --component-size 512
"""

from __future__ import annotations

import argparse
import sys
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


def _timed(fn: Any, repeats: int) -> tuple[float, float]:
    """Fastest of ``repeats`` calls ``fn(i)``: (wall seconds, CPU seconds of this process). On a
    shared machine the CPU time (with one torch thread) is the stable number."""
    best_wall = best_cpu = float("inf")
    for i in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


class _LayerContexts:
    """Reference style: the contexts of the current conditional pass, one list entry per layer."""

    def __init__(self) -> None:
        from studio.methods.attention import AttentionHook

        outer = self
        self.contexts: list[tuple[torch.Tensor, torch.Tensor]] | None = None

        class Hook(AttentionHook):
            def context(self, store, layer, ctx, rows):  # noqa: ANN001 - AttentionHook's signature
                return None if outer.contexts is None else outer.contexts[layer.index]

        self.hook = Hook()


@torch.no_grad()
def reference_style(base: Any, concept: Any, prompt: str, *, steps: int, guidance: float, size: int,
                    seed: int) -> Any:
    """One image, the way the official NeTI inference loop computes it (see the module doc)."""
    from studio.methods.attention import add_hook, remove_hook
    from studio.methods.neti import mapper_from_concept
    from studio.methods.neti.encoder import bypass_direction, text_states
    from studio.methods.runtime import token_table

    pipe = base.pipe
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    mapper = mapper_from_concept(concept).eval()
    table = token_table(pipe)
    table.set("bench", [concept.trigger], [v[None] for v in mapper.static_tokens()])
    layers = _LayerContexts()
    store = add_hook(unet, "bench", layers.hook)
    try:
        ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        uncond = te(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        where = ids == pipe.tokenizer.convert_tokens_to_ids(concept.trigger)
        sched = pipe.scheduler
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, unet.config.in_channels, size // pipe.vae_scale_factor,
                               size // pipe.vae_scale_factor), generator=gen) * sched.init_noise_sigma
        for t in sched.timesteps:
            contexts = []
            for layer in range(len(store.layers)):  # one mapper call and one encoder pass per layer
                token, byp = mapper.split(mapper(t.float()[None], torch.tensor([layer])))[0]
                emb = torch.where(where[..., None], token[:, None], te.get_input_embeddings()(ids))
                direction = bypass_direction(byp, mapper.cfg.bypass_scale)[:, None].expand_as(emb)
                contexts.append(text_states(te, emb, penultimate=False, bypass=direction, where=where))
            x = sched.scale_model_input(latents, t)
            layers.contexts = None
            eps_u = unet(x, t, uncond).sample  # two UNet passes per step
            layers.contexts = contexts
            eps_c = unet(x, t, contexts[0][0]).sample
            latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    finally:
        remove_hook(unet, "bench")
        table.drop("bench")


def bench(base_name: str, steps: int, images: int, size: int | None) -> list[dict[str, Any]]:
    """End to end, one image per call: plain, studio (cache off / on), reference-style."""
    from studio.methods import get_method
    from studio.methods.neti import neti_hook, random_concept

    base = _base(base_name)
    pipe = base.pipe
    size = size or base.native_size
    concept = random_concept(base, "<neti>", 0)
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, width=size, height=size, output_type="np")

    def plain(i: int) -> None:
        pipe(prompt="a photo of a cat", generator=torch.Generator().manual_seed(i), **kw)

    def studio(i: int) -> None:
        pipe(prompt="a photo of <neti>", generator=torch.Generator().manual_seed(i), **kw)

    def reference(i: int) -> None:
        reference_style(base, concept, "a photo of <neti>", steps=steps, guidance=7.5, size=size, seed=i)

    plain(0)  # warm-up
    times = {"plain": _timed(plain, images)}
    applied = get_method("neti").apply(base, concept, strength=1.0)
    try:
        hook = neti_hook(pipe)
        hook.max_cache_bytes = 0  # first sight of every timestep: the batched pass runs each step
        times["studio (first image)"] = _timed(studio, images)
        hook.max_cache_bytes = 1 << 30
        studio(0)  # fill the cache
        times["studio (cached prompt)"] = _timed(studio, images)
        layers = hook.n_layers
    finally:
        applied.remove()
    times["reference-style"] = _timed(reference, images)
    wall0, cpu0 = times["plain"]
    return [{"base": base_name, "what": f"image, {steps} steps, {size}px", "variant": name, "layers": layers,
             "wall_s": wall, "cpu_s": cpu, "cpu_x_plain": cpu / cpu0} for name, (wall, cpu) in times.items()]


@torch.no_grad()
def components(base_name: str, size: int | None, repeats: int) -> list[dict[str, Any]]:
    """Per denoising step: the UNet (CFG batched vs two passes) and the text work (one batched pass
    for all layers vs one pass per layer), so the cost ratios can be read for any resolution."""
    from studio.methods import get_method
    from studio.methods.neti import mapper_from_concept, neti_hook, random_concept
    from studio.methods.neti.encoder import bypass_direction, text_states

    base = _base(base_name)
    pipe = base.pipe
    size = size or base.native_size
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    concept = random_concept(base, "<neti>", 0)
    mapper = mapper_from_concept(concept).eval()
    applied = get_method("neti").apply(base, concept, strength=1.0)
    try:
        hook = neti_hook(pipe)
        ids = tok(["a photo of <neti>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        where = ids == tok.convert_tokens_to_ids("<neti>")
        ctx = te(ids)[0].repeat(2, 1, 1)
        hw = size // pipe.vae_scale_factor
        lat = torch.randn(2, unet.config.in_channels, hw, hw, generator=torch.Generator().manual_seed(0))
        t = torch.tensor(500)

        def per_layer(_: int) -> None:
            for layer in range(hook.n_layers):
                token, byp = mapper.split(mapper(t.float()[None], torch.tensor([layer])))[0]
                emb = torch.where(where[..., None], token[:, None], te.get_input_embeddings()(ids))
                text_states(te, emb, penultimate=False, bypass=bypass_direction(byp, 0.2)[:, None].expand_as(emb),
                            where=where)

        times = {
            "text: one batched pass, all layers (studio)": _timed(lambda _: hook.layer_contexts(0, ids, t[None]), repeats),
            "text: one pass per layer (reference)": _timed(per_layer, repeats),
        }
        layers = hook.n_layers
    finally:
        applied.remove()
    times["unet: CFG batched, B=2"] = _timed(lambda _: unet(lat, t, ctx), repeats)
    times["unet: two passes, B=1 ×2"] = _timed(lambda _: (unet(lat[:1], t, ctx[:1]), unet(lat[1:], t, ctx[1:])),
                                              repeats)
    return [{"base": base_name, "what": f"one step, {size}px", "variant": name, "layers": layers, "wall_s": wall,
             "cpu_s": cpu} for name, (wall, cpu) in times.items()]


def main(argv: list[str] | None = None) -> int:
    from bench.common import table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", default="tiny,sd15", help="comma-separated: tiny, tiny-v, sd15")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2, help="timed images per variant (the fastest counts)")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the base's native; sd15: 256)")
    parser.add_argument("--component-size", type=int, default=None, help="size for the per-step components "
                        "(default: native; sd15: 512)")
    parser.add_argument("--no-images", action="store_true", help="only the per-step components")
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    names = ns.bases.split(",")
    rows, parts = [], []
    for name in names:
        if not ns.no_images:
            rows += bench(name, ns.steps, ns.images, ns.size or (256 if name == "sd15" else None))
        parts += components(name, ns.component_size or (512 if name == "sd15" else None), max(1, ns.images))
    if rows:
        print(table(rows, ["base", "what", "variant", "layers", "wall_s", "cpu_s", "cpu_x_plain"]))
        for name in names:
            r = {row["variant"]: row["cpu_s"] for row in rows if row["base"] == name}
            print(f"{name}: studio/plain {r['studio (first image)'] / r['plain']:.2f}× (cached "
                  f"{r['studio (cached prompt)'] / r['plain']:.2f}×), reference/studio "
                  f"{r['reference-style'] / r['studio (first image)']:.2f}× (CPU seconds)")
        print()
    print(table(parts, ["base", "what", "variant", "layers", "wall_s", "cpu_s"]))
    for name in names:
        c = {row["variant"]: row["cpu_s"] for row in parts if row["base"] == name}
        unet, two = c["unet: CFG batched, B=2"], c["unet: two passes, B=1 ×2"]
        studio = unet + c["text: one batched pass, all layers (studio)"]
        ref = two + c["text: one pass per layer (reference)"]
        print(f"{name} per step: studio/plain {studio / unet:.2f}×, reference/studio {ref / studio:.2f}× "
              f"(text batched vs per layer {c['text: one pass per layer (reference)'] / c['text: one batched pass, all layers (studio)']:.2f}×, "
              f"UNet two passes vs batched {two / unet:.2f}×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
