"""Does the attention-probability capture (``wants_probs``/``probs`` in the shared processor) cost
anything when nobody captures? And what does CoRe cost per step?

    python bench/attention_capture.py [--repeats 5] [--steps 20] [--threads 1] [--ref REV]

Two measurements on the demo world's base (CPU), each interleaved (reference, current, … ``--repeats``
times) so that a machine's drift hits both alike; medians, and the ratio current / reference:

1. **textual inversion, per training step** — the ``demo-world`` preset, no probe, fixed budget:
   the trainer as it was at ``--ref`` (the reference) against today's with CoRe off, and today's
   with CoRe on (``demo-world-core``) for its cost;
2. **one UNet forward + backward with a no-op attention hook** (the path NeTI and Perfusion take) —
   the processor at ``--ref`` against today's.

``--ref`` defaults to the parent of the commit that added ``trainers/core.py`` (HEAD while that file
is uncommitted): the code before CoRe. Its modules are read with ``git show`` and loaded beside
today's. Nothing is asserted; the README quotes the table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_ref() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "trainers/core.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def load_at(rev: str, path: str, name: str) -> types.ModuleType:
    """The module ``path`` as it was at ``rev``, loaded as ``name`` (its imports resolve to today's)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def _base() -> Any:
    import torch

    from studio.models import describe
    from studio.models.profile import world_profile
    from tests.learning.harness import base_pipeline

    return describe(base_pipeline(), spec="demo", name="demo", identity="world-base", device=torch.device("cpu"),
                    dtype=torch.float32, profile=world_profile())


def ti_step_seconds(module: Any, preset: str, images: Path, steps: int) -> float:
    """Median seconds per optimizer step of ``module``'s textual-inversion trainer (steps 2… only)."""
    from trainers.loop import TrainCallbacks, run_training

    class Clock(TrainCallbacks):
        def __init__(self) -> None:
            self.ticks: list[float] = []

        def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
            self.ticks.append(time.perf_counter())

    base = _base()
    entry = module.ENTRY
    cfg = entry.resolve(preset, images=str(images), class_word="circle", token="<hrt>", seed=0, log_every=0,
                        steps=steps, probe=False, budget="fixed")
    clock = Clock()
    run_training(base, entry.make_trainer(base, cfg, "<hrt>"), cfg, method=entry.method, save=False, callbacks=clock)
    return statistics.median(b - a for a, b in zip(clock.ticks, clock.ticks[1:]))


def unet_seconds(processor_cls: Any, iters: int) -> float:
    """Median seconds of a UNet forward + backward (batch 8) through ``processor_cls`` with a no-op hook."""
    import torch

    import studio.methods.attention.processor as proc
    from studio.methods.attention import AttentionHook, add_hook, remove_hook

    unet = _base().pipe.unet
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(8, 4, size, size, generator=g)
    ctx = torch.randn(8, 77, unet.config.cross_attention_dim, generator=g, requires_grad=True)
    t = torch.randint(1000, (8,), generator=g)
    saved = proc.StudioCrossAttnProcessor
    proc.StudioCrossAttnProcessor = processor_cls  # what ensure_installed installs
    times = []
    try:
        add_hook(unet, "bench", AttentionHook())
        for _ in range(iters):
            t0 = time.perf_counter()
            unet(sample, t, ctx).sample.square().mean().backward()
            times.append(time.perf_counter() - t0)
    finally:
        remove_hook(unet, "bench")
        proc.StudioCrossAttnProcessor = saved
    return statistics.median(times)


def interleave(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            out[name].append(fn())
            print(f"  repeat {r + 1}/{repeats} {name}: {out[name][-1] * 1000:.1f} ms", file=sys.stderr, flush=True)
    return out


def table(title: str, results: dict[str, list[float]], ref: str) -> None:
    base = statistics.median(results[ref])
    print(f"\n{title}\n\n| variant | median ms | min ms | max ms | ratio to {ref} |\n|---|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1000:.1f} | {min(values) * 1000:.1f} | {max(values) * 1000:.1f} | {med / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per textual-inversion run")
    parser.add_argument("--iters", type=int, default=10, help="UNet passes per processor measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ref", default=None, help="git revision of the reference code (default: before CoRe)")
    args = parser.parse_args()

    import torch

    import studio.methods.attention.processor as proc
    import trainers.textual_inversion as today
    from studio.world import CONCEPT

    torch.set_num_threads(args.threads)
    ref = args.ref or default_ref()
    old_ti = load_at(ref, "trainers/textual_inversion.py", "_bench_ref_textual_inversion")
    old_proc = load_at(ref, "studio/methods/attention/processor.py", "_bench_ref_processor")
    print(f"reference: {ref} ({subprocess.run(['git', 'rev-parse', '--short', ref], cwd=ROOT, capture_output=True, text=True).stdout.strip()}); "
          f"{args.repeats} interleaved repeats; torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "photos"
        CONCEPT.write_training_folder(images, seed=0)
        ti = interleave({
            "reference (before CoRe)": lambda: ti_step_seconds(old_ti, "demo-world", images, args.steps),
            "today, CoRe off": lambda: ti_step_seconds(today, "demo-world", images, args.steps),
            "today, CoRe on": lambda: ti_step_seconds(today, "demo-world-core", images, args.steps),
        }, args.repeats)
    table(f"Textual inversion on the demo world, seconds per step (demo-world preset, batch 8, {args.steps} steps "
          "per run, median of steps 2…)", ti, "reference (before CoRe)")
    unet = interleave({
        "reference processor": lambda: unet_seconds(old_proc.StudioCrossAttnProcessor, args.iters),
        "today's processor": lambda: unet_seconds(proc.StudioCrossAttnProcessor, args.iters),
    }, args.repeats)
    table("UNet forward + backward with a no-op attention hook (demo world, batch 8)", unet, "reference processor")


if __name__ == "__main__":
    main()
