"""What the measured defaults cost: measured initialisation, rate conversion, the verdict's probe and
the ``auto`` budget's measurements, against the training they belong to (issue: < 5 % of a 500-step run).

On an SD-1.5-sized random pipeline (UNet 860M, CLIP-L) at 256 px, textual inversion with its defaults
(batch 8; ``--init auto``: two candidates scored; lr from the embedding RMS; the probe at the start and
the end; ``--budget auto``) and the same run with all of it off (``--init cross --lr 5e-3 --no-probe``)
train ``--steps`` steps each, alternating, ``--repeats`` times. The extra seconds of the measured run
are its fixed overhead; one auto-budget measurement costs what the final gain costs and happens
``500 / every`` times in a 500-step run. The 500-step run's time is the plain run's measured seconds
per step × 500 (running 500 steps of an SD-sized model on 2 CPU cores would take hours).

    python bench/bench_defaults_overhead.py [--steps 3] [--repeats 2] [--resolution 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    from bench.common import sd15_random, table, write_images
    from trainers import get_trainer
    from trainers.loop import TrainCallbacks
    from trainers.runner import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)

    base = sd15_random()
    entry = get_trainer("textual-inversion")

    class Clock(TrainCallbacks):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
            self.times.append(time.perf_counter())

    plain_kw = dict(init="cross", lr=5e-3, probe=False)
    results: dict[str, list[dict[str, float]]] = {"measured (defaults)": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "img", n=4, size=args.resolution)
        for r in range(args.repeats):
            order = ["measured (defaults)", "plain"] if r % 2 == 0 else ["plain", "measured (defaults)"]
            for name in order:
                extra = plain_kw if name == "plain" else {}
                cfg = entry.resolve(images=str(images), out=f"{tmp}/{name}.safetensors", class_word="cat",
                                    steps=args.steps, resolution=args.resolution, log_every=0, **extra)
                clock = Clock()
                t0 = time.perf_counter()
                result = train(entry, cfg, base, callbacks=clock)
                t1 = time.perf_counter()
                step_s = (clock.times[-1] - clock.times[0]) / max(1, len(clock.times) - 1)
                results[name].append({"total_s": t1 - t0, "to_first_step_s": clock.times[0] - t0,
                                      "after_last_step_s": t1 - clock.times[-1], "step_s": step_s,
                                      "batch": cfg.batch_size,
                                      "every": cfg.probe_every or max(10, 500 // 10)})
                print(f"{name}: {results[name][-1]} (verdict {result.concept.metrics.get('verdict', {}).get('verdict')})",
                      flush=True)
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    m, p = med["measured (defaults)"], med["plain"]
    fixed = (m["to_first_step_s"] - p["to_first_step_s"]) + (m["after_last_step_s"] - p["after_last_step_s"])
    one_measurement = max(0.0, m["after_last_step_s"] - p["after_last_step_s"])  # the final gain: 2 probe losses
    budget = one_measurement * (500 // int(m["every"]))
    run_500 = 500 * p["step_s"]
    rows = [
        {"part": "measured init + rate conversion + probe at start and end", "seconds": fixed,
         "% of a 500-step run": 100 * fixed / run_500},
        {"part": f"auto budget: {500 // int(m['every'])} measurements", "seconds": budget,
         "% of a 500-step run": 100 * budget / run_500},
        {"part": "total", "seconds": fixed + budget, "% of a 500-step run": 100 * (fixed + budget) / run_500},
        {"part": f"(500 steps at {p['step_s']:.2f} s/step, batch {int(p['batch'])}, {args.resolution} px)",
         "seconds": run_500, "% of a 500-step run": 100.0},
    ]
    print(table(rows, ["part", "seconds", "% of a 500-step run"]))


if __name__ == "__main__":
    main()
