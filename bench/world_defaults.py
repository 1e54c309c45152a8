"""Each trainer with its *generic* default preset (the one written for Stable Diffusion, not the
world's ``demo-world``) on the demo world: does it learn on a base nobody tuned it for? (README,
"Defaults that learn".)

    python bench/world_defaults.py textual-inversion [--seeds 0 1] [--lr-mult 0]
    python bench/world_defaults.py dreambooth [--lr 2e-3]
    python bench/world_defaults.py perfusion

The base is described without the world's profile (as a base the presets know nothing about);
scores are the oracle's fidelity/editability over the task's evaluation prompts
(:func:`tests.learning.harness.measure`). Nothing is asserted here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trainer_fn(method: str, work: Path, lr: float | None, lr_mult: float) -> Any:
    """A harness trainer ``(images_dir, seed, lr_scale) -> Trained`` with the method's generic defaults."""
    if method == "textual-inversion":
        import tests.learning.test_defaults_learn as ti

        def run(images_dir: Path, seed: int, lr_scale: float) -> Any:
            return ti.train_with_defaults(images_dir, seed, lr_scale * lr_mult)
        return run
    if method == "dreambooth":
        import tests.learning.test_dreambooth_learns as db
        from trainers.lora import PRESETS

        db.SETTINGS = dict(PRESETS["lora"], token="sks", lr=(lr or PRESETS["lora"]["lr"]) * lr_mult)
        return db.train_dreambooth(work)
    if method == "perfusion":
        import tests.learning.test_perfusion_learns as pf
        from trainers.perfusion import PRESETS as PF

        pf.PRESET = dict(PF["paper"], lr=(lr or PF["paper"]["lr"]) * lr_mult, lr_v=PF["paper"]["lr_v"] * lr_mult)
        return pf.train_perfusion
    raise SystemExit(f"unknown method {method!r}: textual-inversion, dreambooth or perfusion")


def main(argv: list[str] | None = None) -> None:
    import torch

    from tests.learning.harness import measure, references

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    parser.add_argument("--lr-mult", type=float, default=1.0, help="multiply the learning rate (0 = a control)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/studio-world-defaults"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"references: {references()}", flush=True)
    fn = trainer_fn(args.method, args.work / args.method, args.lr, args.lr_mult)
    for seed in args.seeds:
        scores, seconds = measure(fn, args.work / args.method, seed)
        print(f"{args.method} (generic defaults, lr ×{args.lr_mult:g}{f', lr {args.lr:g}' if args.lr else ''}) "
              f"seed {seed}: {scores} in {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
