"""Each trainer with its *default* settings on a learnable base nobody tuned them for (README,
"Defaults that learn"): fidelity, editability, the steps the ``auto`` budget chose, the verdict and
the seconds, per seed.

    python bench/world_defaults.py textual-inversion --base world-b [--seeds 0 1] [--lr-mult 0]
    python bench/world_defaults.py dreambooth --base world --set budget=fixed
    python bench/world_defaults.py all --base world world-b --seeds 0 1

The base is loaded from its folder and the config resolved with no preset and a profile that knows
nothing about it (:mod:`tests.learning.defaults`); scores are the oracle's fidelity/editability
over the task's evaluation prompts (:func:`tests.learning.harness.measure`). Nothing is asserted here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    from studio.world import WORLD_B_RESOLUTION
    from tests.learning.defaults import BASES, METHODS, train_default
    from tests.learning.harness import measure, references

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=[*METHODS, "all"])
    parser.add_argument("--base", nargs="+", default=["world"], choices=sorted(BASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr-mult", type=float, default=1.0, help="multiply every learning rate (0 = a control)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field (JSON value), e.g. --set budget=\"fixed\"")
    parser.add_argument("--work", type=Path, default=Path("/tmp/studio-world-defaults"))
    args = parser.parse_args(argv)
    overrides = {k: _value(v) for k, _, v in (item.partition("=") for item in args.set)}
    methods = METHODS if args.method == "all" else (args.method,)
    print("| method | base | seed | fidelity | editability | steps run (kept) | verdict (gain) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for base in args.base:
        base_dir = None if base == "world" else BASES[base]
        size = None if base == "world" else WORLD_B_RESOLUTION
        print(f"<!-- {base} references: {references(base_dir=base_dir)} -->", flush=True)
        for method in methods:
            fn = train_default(method, base, args.work / base / method, **overrides)
            for seed in args.seeds:
                scores, seconds = measure(fn, args.work / base / method, seed, args.lr_mult, size=size)
                metrics = fn.last.concept.metrics.get("verdict", {})  # type: ignore[attr-defined]
                budget = metrics.get("budget") or {}
                steps = f"{budget.get('steps_run', '—')} ({budget.get('kept_step', '—')})" if budget else "fixed"
                print(f"| {method} | {base} | {seed} | {scores.fidelity:.3f} | {scores.editability:.3f} | {steps} | "
                      f"{metrics.get('verdict', '—')} ({metrics.get('gain', float('nan')):+.3f}) | {seconds:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
