"""Automatic subject masks (``python -m studio dataset mask``) measured in the learnable world.

    python bench/dataset_masks.py [--seeds 0 1 2] [--world-images 500] [--skip-training]

Two tables (markdown), nothing asserted:

(a) GrabCut's masks against the renderer's true masks (:func:`studio.world.render.render_mask`, the
    shape's silhouette at output resolution, ≥ 50 % coverage = subject): on the concept's training
    photos (the seeds of table b) and on random world images (uniform attributes, jittered), at the
    world's 32 px and drawn at 128 px. IoU mean/min, and the mean share of the true subject the mask
    covers (recall) and of the mask that is subject (precision).
(b) Textual inversion with its *defaults* on the demo world (:mod:`tests.learning.defaults`: no preset,
    a profile that knows nothing of the base) trained on the concept's photos with no masks, with
    GrabCut's masks, and with the true masks written as ``name.mask.png`` sidecars into the folder the
    trainer reads; fidelity/editability from the oracle over the task's evaluation prompts
    (:func:`tests.learning.harness.measure`, 40 images per seed), as ``bench/world_defaults.py`` scores.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MASKINGS = ("none", "grabcut", "true")


def concept_photos(seed: int, n: int = 5, size: int = 32) -> list[tuple[object, object]]:
    """``(photo, true mask)`` of ``CONCEPT.training_images(n, seed, size)``, rebuilt with the task's own draws."""
    from studio.world import CONCEPT
    from studio.world.render import render, render_mask

    rng = random.Random(f"concept-train/{seed}")  # as ConceptTask.training_images draws its jitters
    pairs = []
    for i in range(n):
        attributes = CONCEPT.attributes(background=CONCEPT.train_backgrounds[i % len(CONCEPT.train_backgrounds)],
                                        size=CONCEPT.train_sizes[(i // len(CONCEPT.train_backgrounds))
                                                                 % len(CONCEPT.train_sizes)])
        jitter = rng.randrange(2**31)
        pairs.append((render(attributes, jitter=jitter, size=size), render_mask(attributes, jitter=jitter, size=size)))
    expected = CONCEPT.training_images(n=n, seed=seed, size=size)
    if [np.asarray(p).tobytes() for p, _ in pairs] != [np.asarray(p).tobytes() for p in expected]:
        raise RuntimeError("the concept's photos are no longer drawn as this bench rebuilds them; update it")
    return pairs


def world_photos(n: int, size: int, seed: int = 0) -> list[tuple[object, object]]:
    """``n`` random world images (uniform attributes, jittered) and their true masks."""
    from studio.world.render import render, render_mask, sample_attributes

    rng = random.Random(f"bench-dataset-masks/{seed}")
    pairs = []
    for _ in range(n):
        attributes, jitter = sample_attributes(rng), rng.randrange(2**31)
        pairs.append((render(attributes, jitter=jitter, size=size), render_mask(attributes, jitter=jitter, size=size)))
    return pairs


def mask_scores(pairs) -> dict[str, float]:
    """GrabCut on each photo vs its true mask: IoU mean/min, recall and precision means."""
    from studio.dataset.segmenters import GrabCutSegmenter

    seg = GrabCutSegmenter()
    ious, recalls, precisions = [], [], []
    t0 = time.perf_counter()
    masks = seg.segment([photo for photo, _ in pairs], "")
    seconds = time.perf_counter() - t0
    for (_, truth), mask in zip(pairs, masks):
        m, t = np.asarray(mask) >= 128, np.asarray(truth) >= 128
        inter = float((m & t).sum())
        ious.append(inter / max(1.0, float((m | t).sum())))
        recalls.append(inter / max(1.0, float(t.sum())))
        precisions.append(inter / max(1.0, float(m.sum())))
    return {"n": len(pairs), "iou": statistics.fmean(ious), "min": min(ious), "recall": statistics.fmean(recalls),
            "precision": statistics.fmean(precisions), "ms": 1000 * seconds / len(pairs)}


def table_a(seeds: list[int], world_images: int) -> None:
    rows = [(f"the concept's training photos (seeds {', '.join(map(str, seeds))}), 32 px",
             [pair for s in seeds for pair in concept_photos(s)]),
            ("random world images, 32 px", world_photos(world_images, 32)),
            ("random world images, drawn at 128 px", world_photos(world_images, 128))]
    print("| images | n | IoU mean | IoU min | recall | precision | ms / image |")
    print("|---|---|---|---|---|---|---|")
    for label, pairs in rows:
        s = mask_scores(pairs)
        print(f"| {label} | {s['n']} | {s['iou']:.3f} | {s['min']:.3f} | {s['recall']:.3f} | {s['precision']:.3f} | "
              f"{s['ms']:.1f} |", flush=True)


def write_masks(images_dir: Path, seed: int, masking: str) -> float | None:
    """Write ``masking``'s sidecars beside the concept's photos in ``images_dir``; the mean coverage."""
    from studio.dataset.mask import mask_folder, mask_path
    from studio.dataset.segmenters import GrabCutSegmenter

    photos = sorted(p for p in images_dir.glob("*.png") if not p.name.endswith(".mask.png"))
    if masking == "none":
        return None
    if masking == "grabcut":
        results = mask_folder(images_dir, GrabCutSegmenter())
        if any(r.status != "written" for r in results):
            raise RuntimeError(f"GrabCut did not mask every photo: {[(r.image.name, r.status) for r in results]}")
        return statistics.fmean(r.coverage or 0.0 for r in results)
    truths = [mask for _, mask in concept_photos(seed, n=len(photos))]
    for photo, truth in zip(photos, truths):
        truth.save(mask_path(photo))  # type: ignore[attr-defined]
    return statistics.fmean(float((np.asarray(t) >= 128).mean()) for t in truths)


def table_b(seeds: list[int], work: Path) -> None:
    from tests.learning.defaults import train_default
    from tests.learning.harness import measure, references

    print(f"<!-- world references: {references()} -->", flush=True)
    print("| masks | seed | mask coverage | fidelity | editability | steps run (kept) | verdict (gain) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, list[tuple[float, float]]] = {}
    for masking in MASKINGS:
        folder = work / masking
        shutil.rmtree(folder, ignore_errors=True)
        inner = train_default("textual-inversion", "world", folder)
        coverage: dict[int, float | None] = {}

        def train(images_dir: Path, seed: int, lr_scale: float, masking=masking, inner=inner, coverage=coverage):
            coverage[seed] = write_masks(images_dir, seed, masking)
            return inner(images_dir, seed, lr_scale)

        for seed in seeds:
            scores, seconds = measure(train, folder, seed)
            verdict = inner.last.concept.metrics.get("verdict", {})  # type: ignore[attr-defined]
            budget = verdict.get("budget") or {}
            steps = f"{budget.get('steps_run', '—')} ({budget.get('kept_step', '—')})" if budget else "fixed"
            cov = coverage[seed]
            summary.setdefault(masking, []).append((scores.fidelity, scores.editability))
            print(f"| {masking} | {seed} | {'—' if cov is None else f'{cov:.1%}'} | {scores.fidelity:.3f} | "
                  f"{scores.editability:.3f} | {steps} | {verdict.get('verdict', '—')} "
                  f"({verdict.get('gain', float('nan')):+.3f}) | {seconds:.0f} |", flush=True)
    for masking, values in summary.items():
        fid = [f for f, _ in values]
        edit = [e for _, e in values]
        print(f"| **{masking}: mean** | {len(values)} seeds | | **{statistics.fmean(fid):.3f}** (min {min(fid):.3f}) | "
              f"**{statistics.fmean(edit):.3f}** (min {min(edit):.3f}) | | | |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world-images", type=int, default=500, help="random world images in table (a)")
    parser.add_argument("--skip-training", action="store_true", help="table (a) only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/studio-dataset-masks"))
    args = parser.parse_args(argv)
    print("(a) GrabCut masks vs the renderer's true masks\n")
    table_a(args.seeds, args.world_images)
    if not args.skip_training:
        print("\n(b) textual inversion's defaults on the demo world, by the masks of its photos\n")
        table_b(args.seeds, args.work)


if __name__ == "__main__":
    main()
