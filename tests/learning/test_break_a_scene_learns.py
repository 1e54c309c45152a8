"""Learning test: Break-A-Scene with its defaults learns the world's concept from ONE photo split into two
concepts — the shape (the concept) and its background — and at learning rate 0 it does not.

The photo is the task's first training photo (white background); the masks are the world's true shape mask
(:func:`studio.world.render.render_mask`, same jitter) and its complement. Only the shape's file is scored:
the evaluation prompts ask for backgrounds and a size the photo does not show, so the shape token must not
have kept the photo's background — the background concept is there to take it.

:func:`train_break_a_scene_fn` is a harness ``TrainFn`` factory (``(images_dir, seed, lr_scale) -> Trained``)
that benches and the two-object scene world can reuse.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

from studio.world.score import pipeline_generator
from studio.world.task import CONCEPT
from tests.learning.harness import Trained, assert_does_not_learn, assert_learns, concept_bytes

pytestmark = pytest.mark.learning


@functools.lru_cache(maxsize=2)
def _base(base_dir: Path | None = None):
    """The demo base, or the world's base in ``base_dir`` (the second learnable base), loaded once."""
    from studio.models import load_base

    return load_base(str(base_dir) if base_dir else "demo", device="cpu")


def scene_from_task_photo(images_dir: Path, seed: int, out: Path, size: int = 32) -> tuple[Path, Path]:
    """``out/img/00.png`` (the task's first training photo of ``seed``, as ``write_training_folder`` draws it)
    and ``out/masks/00.shape.png`` / ``00.background.png`` (its true shape mask and the complement)."""
    from studio.world import render
    from studio.world.render import render_mask

    img, masks = out / "img", out / "masks"
    img.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    jitter = random.Random(f"concept-train/{seed}").randrange(2**31)  # the first draw of training_images()
    attributes = CONCEPT.attributes(background=CONCEPT.train_backgrounds[0], size=CONCEPT.train_sizes[0])
    photo = render(attributes, jitter=jitter, size=size)
    with Image.open(sorted(images_dir.glob("*.png"))[0]) as first:
        assert list(photo.getdata()) == list(first.convert("RGB").getdata()), "not the task's first photo"
    photo.save(img / "00.png")
    shape = render_mask(attributes, jitter=jitter, size=size)
    shape.save(masks / "00.shape.png")
    ImageOps.invert(shape).save(masks / "00.background.png")
    return img, masks


def train_break_a_scene_fn(workdir: Path, base_dir: Path | None = None, size: int = 32, **overrides: Any):
    """A harness ``TrainFn``: Break-A-Scene with its defaults (``overrides`` replace them) on the scene of
    :func:`scene_from_task_photo` (``size`` px, on the base in ``base_dir``, default the demo base);
    ``lr_scale`` multiplies the token and LoRA rates (0 = the control, two steps)."""
    from studio.methods import get_method
    from trainers.break_a_scene import ENTRY, train_break_a_scene

    defaults = ENTRY.resolve(**overrides)

    def run(images_dir: Path, seed: int, lr_scale: float) -> Trained:
        base = _base(base_dir)
        img, masks = scene_from_task_photo(images_dir, seed, workdir / f"scene-{seed}-{lr_scale:g}", size)
        values = dict(overrides)
        if lr_scale != 1:  # both rates are linear in their scales
            values |= {"token_lr_scale": defaults.token_lr_scale * lr_scale, "lr_scale": defaults.lr_scale * lr_scale}
        if lr_scale == 0:  # nothing moves at learning rate 0 however long the run: the control trains two steps
            values |= {"steps": 2, "phase1_steps": 1}
        res = train_break_a_scene(base, img, masks, concepts=CONCEPTS, seed=seed, log_every=0, **values)
        shape = res.concepts[0]
        generate_plain = pipeline_generator(base.pipe)

        def generate(prompts, gen_seed):
            handle = get_method(shape.method).apply(base, shape, strength=1.0)
            try:
                return generate_plain(prompts, gen_seed)  # "<shape>" names the concept alone
            finally:
                handle.remove()

        return Trained(subject=shape.trigger, generate=generate, size_bytes=concept_bytes(shape))

    return run


CONCEPTS = f"shape:{CONCEPT.class_word},background:background"


def test_break_a_scene_learns_the_shape_of_one_photo(tmp_path):
    assert_learns(train_break_a_scene_fn(tmp_path), tmp_path, seeds=(0, 1), name="Break-A-Scene")


def test_break_a_scene_at_learning_rate_zero_does_not_learn(tmp_path):
    assert_does_not_learn(train_break_a_scene_fn(tmp_path), tmp_path, name="Break-A-Scene")


def main(argv: list[str] | None = None) -> None:
    """The README's Break-A-Scene table: ``python -m tests.learning.test_break_a_scene_learns --world demo|world-b
    --seeds 0,1,2 [--set name=json-value …] [--lr-scale 0]`` prints one JSON row per seed (the harness's scores)."""
    import argparse
    import json
    import tempfile

    from studio.world import WORLD_B_BASE_DIR, WORLD_B_RESOLUTION
    from tests.learning.harness import measure, references

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--world", choices=["demo", "world-b"], default="demo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], help="a config override, name=json-value")
    parser.add_argument("--lr-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as the test suite (tests/conftest.py): two threads crawl on a busy 2-core machine
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    base_dir, size = (WORLD_B_BASE_DIR, WORLD_B_RESOLUTION) if args.world == "world-b" else (None, 32)
    refs = references(base_dir=base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fn = train_break_a_scene_fn(Path(tmp), base_dir=base_dir, size=size, **overrides)
        for seed in (int(x) for x in args.seeds.split(",")):
            scores, seconds = measure(fn, Path(tmp), seed, args.lr_scale, size=size if base_dir else None)
            print(json.dumps({"world": args.world, "seed": seed, "set": overrides, "lr_scale": args.lr_scale,
                              "fidelity": round(scores.fidelity, 3), "editability": round(scores.editability, 3),
                              "seconds": round(seconds, 1), "bars": [round(refs.fidelity_bar, 3),
                                                                     round(refs.editability_bar, 3)]}), flush=True)


if __name__ == "__main__":
    main()
