"""Inference with concepts: time per denoising step of the studio's generation over the plain diffusers
pipeline, with each concept method alone and with five at once (issue 24, item 3).

An SD-1.5-sized pipeline with random weights (UNet 860M, CLIP-L; :func:`bench.common.sd15_random`), its
VAE swapped for a tiny one of the same latent shape (``--full-vae`` keeps the real one: the decode is
no part of a step and cancels below anyway). Contenders, interleaved over ``--repeats`` rounds:

* **plain** — ``pipe(prompt, …)`` of diffusers, no studio code on the pipeline at all;
* **studio** — :func:`studio.generation.generate` with no concept;
* **TI**, **LoRA fused** (generation's default), **LoRA unfused** (``--no-fuse-lora``: PEFT adapters at
  every step; shown, not bounded), **Perfusion**, **NeTI**, **IP-Adapter** — one concept each;
* **all five** — TI + LoRA (fused) + Perfusion + NeTI + IP-Adapter in one prompt.

Concepts are random but shaped for the base and made by the studio's own constructors: TI vectors
under the file keys, a rank-8 kohya LoRA on the UNet's and text encoder's attention projections (the
DreamBooth-LoRA defaults, :func:`bench.gpu_smoke.smoke_lora`), Perfusion from
:func:`bench.bench_perfusion.random_concept` (real ``i*``, C⁻¹ from ``--captions`` generated captions:
the per-step cost does not depend on the corpus), NeTI from :func:`studio.methods.neti.random_concept`,
IP-Adapter from a fresh adapter (:func:`~studio.methods.zeroshot.adapter.new_adapter`, written in the
published layout) and a small CLIP image encoder through
:func:`~studio.methods.zeroshot.make_zeroshot_concept` — the image is encoded once, when the concept
is made, so the encoder is no part of a step.

**Per step** = the slope between two step counts (``--steps LO HI``): ``(t(HI) − t(LO)) / (HI − LO)``,
so prompt encoding, applying/removing concepts and the decode cancel. Times are this process's CPU
time (one torch thread: on a machine shared with other jobs the CPU time is the compute cost) and
wall time. Beside the slope, a UNet forward pre-hook times every step inside the loop
(:class:`StepClock`): its CPU time, and its *user* time alone, which leaves out the kernel's
page-fault work. How many fresh pages a step faults in depends on glibc's allocator state — what the
process allocated and freed before, i.e. which contender ran last — not on the step (up to a tenth of
a step's CPU time at 512 px here, moving between contenders from run to run); ``--malloc steady``
(the default) stops heap trimming and fixes the mmap threshold, so after the warm-up no contender
faults and CPU time is compute (``--malloc default`` shows the allocator as it comes). Each ratio
to **plain** is the median over the rounds of the ratio within a round. Bounds (judged on the slope's CPU ratio): ≤ 1.10 with one concept, ≤ 1.15
with all five.

    python bench/inference_overhead.py                                   # 256 px, steps 2 and 6, 3 rounds
    python bench/inference_overhead.py --size 512 --steps 2 4 --repeats 2
    python bench/inference_overhead.py --only NeTI "all five" --size 128 --neti-cached

NeTI runs one batched text-encoder pass for all cross-attention layers per step (its per-timestep,
per-layer token; docs/methods.md §5): ``L`` sequences of 77 tokens through CLIP every step, the
method's own arithmetic, not overhead. ``--neti-cached`` adds a row for a prompt already rendered in
the same call (the second of two images; its contexts come from the per-timestep cache).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/inference_overhead.py` from the repository root
    sys.path.insert(0, str(ROOT))

GUIDANCE = 7.5
ONE_BOUND, ALL_BOUND = 1.10, 1.15
PROMPT = "a photo of {} on a sandy beach"


# -- the base -------------------------------------------------------------------------------------------
def tiny_vae(like: Any) -> Any:
    """An ``AutoencoderKL`` with ``like``'s latent channels, scaling factor and downsampling (so the
    pipeline's ``vae_scale_factor`` and latent shape stay), at toy widths: decoding is no part of a step."""
    from diffusers import AutoencoderKL

    levels = len(like.config.block_out_channels)
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(16,) * levels,
                         layers_per_block=1, latent_channels=like.config.latent_channels, norm_num_groups=8,
                         scaling_factor=like.config.scaling_factor)


def build_base(name: str, full_vae: bool) -> Any:
    """``sd15``: the SD-1.5-sized random pipeline (its VAE swapped for :func:`tiny_vae` unless ``full_vae``);
    ``tiny``: the studio's tiny base (a quick check of the same code path)."""
    if name == "tiny":
        from studio.models import load_base

        base = load_base("tiny", device="cpu")
    else:
        from bench.common import sd15_random

        base = sd15_random()
        if not full_vae:
            base.pipe.vae = tiny_vae(base.pipe.vae)
    for module in (base.pipe.unet, base.pipe.text_encoder, base.pipe.vae):
        module.eval().requires_grad_(False)
    return base


# -- the concepts ---------------------------------------------------------------------------------------
def ti_concept(base: Any, trigger: str, seed: int, n_vectors: int = 2) -> Any:
    """``n_vectors`` random vectors per text encoder, at the width and norm of real token embeddings."""
    from studio.concept import Concept
    from studio.methods.runtime import text_encoders
    from studio.methods.textual_inversion.files import tensor_keys

    g = torch.Generator().manual_seed(seed)
    encs = text_encoders(base.pipe)
    tensors = {}
    for key, (_, te) in zip(tensor_keys(len(encs), base.family), encs):
        norm = float(te.get_input_embeddings().weight.norm(dim=-1).mean())
        v = torch.randn(n_vectors, te.config.hidden_size, generator=g)
        tensors[key] = v / v.norm(dim=-1, keepdim=True) * norm
    return Concept(method="textual_inversion", tokens=[trigger], tensors=tensors, class_word="cat",
                   name=trigger.strip("<>"), base=base.fingerprint())


def lora_concept(base: Any, trigger: str) -> Any:
    """Rank 8 on the UNet's to_q/k/v/out.0 and the text encoder's q/k/v/out_proj (DreamBooth-LoRA's targets)."""
    import dataclasses

    from bench.gpu_smoke import smoke_lora

    return dataclasses.replace(smoke_lora(base), tokens=[trigger], class_word="dog", name=trigger.strip("<>"),
                               base=base.fingerprint())


def ip_concept(base: Any, trigger: str, work: Path) -> Any:
    """A zero-shot concept of a fresh base-kind adapter for ``base`` and a small random CLIP image encoder."""
    from transformers import CLIPVisionConfig

    from bench.common import write_images
    from bench.gpu_smoke import _image_encoder
    from studio.methods.zeroshot import make_zeroshot_concept
    from studio.methods.zeroshot.adapter import WEIGHT_NAME, new_adapter, published_state, save_adapter_file

    folder = work / "adapter"
    encoder = _image_encoder(folder / "image_encoder", 224)
    embed_dim = int(CLIPVisionConfig.from_pretrained(str(encoder)).projection_dim)
    adapter = new_adapter(base.pipe.unet, embed_dim, num_tokens=4)
    save_adapter_file(folder / WEIGHT_NAME, published_state(base.pipe.unet, adapter))
    photos = write_images(work / "photos", n=1, size=224)
    return make_zeroshot_concept([str(photos / "0.png")], str(folder), image_encoder=str(encoder),
                                 name=trigger.strip("<>"), token=trigger, class_word="dog", pipe=base.pipe)


def make_concepts(base: Any, work: Path) -> dict[str, Any]:
    from bench.bench_perfusion import random_concept as perfusion_concept
    from studio.methods.neti import random_concept as neti_concept

    return {"ti": ti_concept(base, "<ti>", 1), "lora": lora_concept(base, "<lora>"),
            "perfusion": perfusion_concept(base, "<pf>", 2), "neti": neti_concept(base, "<neti>", 3),
            "ip": ip_concept(base, "<ip>", work)}


# -- the contenders -------------------------------------------------------------------------------------
@contextlib.contextmanager
def perfusion_covariance(n_captions: int) -> Iterator[None]:
    """Generation asks for C⁻¹ from the default 20 000-caption corpus; here from ``n_captions``
    (computed once, then held in memory on the base). The per-step cost does not depend on it."""
    import studio.generation as generation
    from studio.methods.perfusion.covariance import CovarianceSettings

    original = generation.method_options
    settings = CovarianceSettings(n_captions=n_captions)

    def with_covariance(cfg: Any) -> dict[str, dict[str, Any]]:
        out = original(cfg)
        out["perfusion"] = {**out.get("perfusion", {}), "covariance": settings}
        return out

    generation.method_options = with_covariance
    try:
        yield
    finally:
        generation.method_options = original


@dataclass
class Contender:
    """``run(steps)`` renders one image of ``steps`` denoising steps; with ``minus``, the time of
    ``minus(steps)`` is subtracted (what ``run`` does beyond it). ``bound``: the ratio to plain allowed."""

    run: Callable[[int], None]
    bound: float | None = ONE_BOUND
    minus: Callable[[int], None] | None = None


def contenders(base: Any, concepts: dict[str, Any], size: int, neti_cached: bool) -> dict[str, Contender]:
    """The contenders of the module doc, rendering ``size`` px images with classifier-free guidance."""
    from studio.generation import GenerateConfig, generate
    from studio.methods.attention import store_of

    def plain(steps: int) -> None:
        base.pipe(prompt=PROMPT.format("a cat"), negative_prompt=None, num_inference_steps=steps, width=size,
                  height=size, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="pil")

    def studio(names: list[str], fuse: bool = True, images: int = 1) -> Callable[[int], None]:
        chosen = [concepts[n] for n in names]
        words = " and ".join(c.trigger for c in chosen) or "a cat"

        def run(steps: int) -> None:
            cfg = GenerateConfig(prompt=PROMPT.format(words), steps=steps, guidance=GUIDANCE, width=size,
                                 height=size, seed=0, fuse_lora=fuse, num_images=images)
            generate(base, cfg, [(c, 1.0, n) for c, n in zip(chosen, names)])
            assert store_of(base.pipe.unet) is None, "a concept left the studio processors on the UNet"
        return run

    out = {"plain": Contender(plain, None), "studio": Contender(studio([])), "TI": Contender(studio(["ti"])),
           "LoRA fused": Contender(studio(["lora"])), "LoRA unfused": Contender(studio(["lora"], fuse=False), None),
           "Perfusion": Contender(studio(["perfusion"])), "NeTI": Contender(studio(["neti"])),
           "IP-Adapter": Contender(studio(["ip"])),
           "all five": Contender(studio(["ti", "lora", "perfusion", "neti", "ip"]), ALL_BOUND)}
    if neti_cached:  # two images of one prompt minus one image: the second image reads the per-timestep cache
        out["NeTI, prompt cached"] = Contender(studio(["neti"], images=2), None, minus=studio(["neti"]))
    return out


def steady_malloc() -> bool:
    """glibc only: stop ``free`` from giving the heap's top back to the kernel and fix the mmap threshold at
    its largest (32 MiB), so that after the warm-up a step's tensors reuse heap pages instead of faulting
    in fresh ones. Without it, how many pages a step faults in (up to a tenth of a step's CPU time at
    512 px here) depends on what the process allocated and freed before — which contender ran last —
    not on the step. Returns whether it was set."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


# -- measuring ------------------------------------------------------------------------------------------
LOOP = ("cpu", "user", "sys", "minflt")  # what StepClock notes per step


class StepClock:
    """A forward pre-hook on the UNet that notes the process's CPU time (user + system) and minor page
    faults at every UNet call: with classifier-free guidance in one batched call per step, consecutive
    marks are one step apart whatever runs in between (other pre-hooks, the UNet, the scheduler). A
    second estimate beside the slope; its user time leaves out the kernel's page-fault work, which
    on a CPU depends on the allocator's state (glibc hands large tensors fresh pages), not on the
    arithmetic."""

    def __init__(self, unet: Any):
        self.marks: list[tuple[float, float, float]] = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.marks.append(self._now()))

    @staticmethod
    def _now() -> tuple[float, float, float]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, float(r.ru_minflt)

    def steps(self) -> dict[str, list[float]]:
        """Per step whose next step started since the last call: CPU, user and system seconds and minor
        page faults (keys :data:`LOOP`); clears the marks."""
        d = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return {"cpu": [u + k for u, k, _ in d], "user": [u for u, _, _ in d], "sys": [k for _, k, _ in d],
                "minflt": [f for _, _, f in d]}


def clock(fn: Callable[[int], None], steps: int) -> tuple[float, float]:
    """(wall s, CPU s of this process) of ``fn(steps)``."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    fn(steps)
    return time.perf_counter() - w0, time.process_time() - c0


def measure(runs: dict[str, Contender], lo: int, hi: int, repeats: int, steps: StepClock,
            log: Callable[[str], None]) -> dict[str, dict[str, list[float]]]:
    """Per contender and round: the slopes ``"wall"`` and ``"cpu"`` (seconds per step) and ``"loop_cpu"``,
    ``"loop_user"``, ``"loop_sys"``, ``"loop_minflt"``: medians over the in-loop steps of the ``HI``-step
    run (:class:`StepClock`; none for a contender with ``minus``)."""
    for name, c in runs.items():  # warm-up: caches (C⁻¹, the adapter file, first-call allocations)
        clock(c.run, 1)
        log(f"warm: {name}")
    out: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": [], **{"loop_" + k: [] for k in LOOP}}
                                              for n in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # no contender always runs first
        for name in order:
            c = runs[name]
            (w_lo, c_lo) = clock(c.run, lo)
            steps.steps()
            (w_hi, c_hi) = clock(c.run, hi)
            if c.minus is None:
                for key, values in steps.steps().items():
                    out[name]["loop_" + key].append(statistics.median(values))
            else:
                (mw_lo, mc_lo), (mw_hi, mc_hi) = clock(c.minus, lo), clock(c.minus, hi)
                w_lo, c_lo, w_hi, c_hi = w_lo - mw_lo, c_lo - mc_lo, w_hi - mw_hi, c_hi - mc_hi
            steps.steps()
            out[name]["wall"].append((w_hi - w_lo) / (hi - lo))
            out[name]["cpu"].append((c_hi - c_lo) / (hi - lo))
            log(f"round {r + 1}/{repeats} {name}: {1000 * out[name]['cpu'][-1]:.0f} ms/step CPU, "
                f"{1000 * out[name]['wall'][-1]:.0f} ms/step wall")
    return out


def rows_of(runs: dict[str, Contender], slopes: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """The table: median times per step, and each contender's ratio to plain as the median over the
    rounds of the ratio within a round (so a machine that slows down between rounds cancels)."""
    plain = slopes["plain"]

    def ratio(s: dict[str, list[float]], key: str) -> float | None:
        pairs = [a / b for a, b in zip(s[key], plain[key])]
        return statistics.median(pairs) if pairs else None

    rows = []
    for name, s in slopes.items():
        b = runs[name].bound
        r = ratio(s, "cpu")
        assert r is not None  # every contender has a slope per round
        rows.append({"contender": name, "cpu ms/step": 1000 * statistics.median(s["cpu"]),
                     "wall ms/step": 1000 * statistics.median(s["wall"]), "cpu × plain": r,
                     "wall × plain": ratio(s, "wall"), "in-loop cpu × plain": ratio(s, "loop_cpu"),
                     "in-loop user × plain": ratio(s, "loop_user"),
                     "bound": "" if b is None else f"≤ {b:.2f}",
                     "within": "" if b is None else ("yes" if r <= b else "NO")})
    return rows


def arithmetic(size: int, n_layers: int) -> tuple[float, float]:
    """(GFLOPs of one UNet step on a CFG batch of 2 at ``size`` px, GFLOPs of NeTI's text pass: ``n_layers``
    sequences of 77 tokens through the text encoder), counted by PyTorch's FLOP counter on meta-device
    copies of the SD-1.5 configs (no weights, no time)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.common import CONFIGS

    root = CONFIGS / "sd1"
    te_cfg = {k: v for k, v in json.loads((root / "text_encoder" / "config.json").read_text()).items()
              if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype")}
    hw = size // 8
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
        width = int(unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as count:
            unet(torch.zeros(2, int(unet.config.in_channels), hw, hw), torch.tensor(500), torch.zeros(2, 77, width))
        step = count.get_total_flops()
        with FlopCounterMode(display=False) as count:
            te(torch.zeros(n_layers, 77, dtype=torch.long))
        text = count.get_total_flops()
    return step / 1e9, text / 1e9


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) and "×" in k else f"{v:.0f}" if isinstance(v, float) else
                 "" if v is None else str(v) for k, v in r.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", choices=["sd15", "tiny"], default="sd15",
                   help="sd15: the SD-1.5-sized random pipeline; tiny: the tiny base (a quick check of the code)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: 256 for sd15, the tiny "
                   "base's native size)")
    p.add_argument("--steps", type=int, nargs=2, default=(2, 6), metavar=("LO", "HI"),
                   help="the two step counts whose difference gives the time per step")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the compute cost)")
    p.add_argument("--captions", type=int, default=256, help="captions for Perfusion's C⁻¹ (no part of a step)")
    p.add_argument("--full-vae", action="store_true", help="keep the SD-1.5-sized VAE instead of a tiny one")
    p.add_argument("--neti-cached", action="store_true", help="add NeTI on a prompt seen before in the call")
    p.add_argument("--malloc", choices=["steady", "default"], default="steady",
                   help="steady: no heap trimming, fixed mmap threshold (glibc), so page faults do not move "
                   "between contenders; default: the allocator as it comes")
    p.add_argument("--only", nargs="+", default=None, help="contenders to run (plain is always run)")
    p.add_argument("--json", default=None, help="also write the per-round slopes and the table to this file")
    ns = p.parse_args(argv)
    lo, hi = ns.steps
    if not 1 <= lo < hi:
        p.error("--steps LO HI needs 1 ≤ LO < HI")
    torch.set_num_threads(ns.threads)
    steady = ns.malloc == "steady" and steady_malloc()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="inference_overhead-") as tmp:
        os.environ.setdefault("STUDIO_PERFUSION_CACHE", str(Path(tmp) / "perfusion"))
        t0 = time.perf_counter()
        base = build_base(ns.base, ns.full_vae)
        size = ns.size or (256 if ns.base == "sd15" else base.native_size)
        concepts = make_concepts(base, Path(tmp))
        log(f"base and concepts built in {time.perf_counter() - t0:.0f} s")
        runs = contenders(base, concepts, size, ns.neti_cached)
        if ns.only:
            unknown = set(ns.only) - set(runs)
            if unknown:
                p.error(f"unknown contenders {sorted(unknown)}; choose from {list(runs)}")
            runs = {k: v for k, v in runs.items() if k == "plain" or k in ns.only}
        with perfusion_covariance(ns.captions):
            slopes = measure(runs, lo, hi, ns.repeats, StepClock(base.pipe.unet), log)
    rows = rows_of(runs, slopes)
    label = "SD-1.5-sized random pipeline" if ns.base == "sd15" else f"base {base.name}"
    scale = int(base.pipe.vae_scale_factor)
    print(f"{label}, {size} px ({size // scale}×{size // scale} latents), CFG batch 2, {ns.threads} thread(s); per "
          f"step = slope between {lo} and {hi} steps, median of {ns.repeats} rounds; allocator "
          f"{'steady (no heap trimming)' if steady else 'as it comes'}")
    print(markdown(rows))
    if "NeTI" in runs and ns.base == "sd15":
        from studio.methods.attention import unet_layers

        n_layers = len(unet_layers(base.pipe.unet))
        unet_gf, text_gf = arithmetic(size, n_layers)
        print(f"Arithmetic: a UNet step (2 rows) {unet_gf:.0f} GFLOPs; NeTI's text pass ({n_layers} × 77 tokens) "
              f"{text_gf:.0f} GFLOPs per step → NeTI's floor {1 + text_gf / unet_gf:.3f} × plain")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"args": vars(ns), "slopes": slopes, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
