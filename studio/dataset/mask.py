"""Dataset step ``mask``: a subject mask beside every photo, as the ``name.mask.png`` sidecar.

    python -m studio dataset mask DIR [--model grabcut|clipseg|ID_OR_DIR] [--prompt "the dog"]
                                      [--class-word dog] [--force]

Every trainer reads ``name.mask.png`` (:mod:`trainers.data`: white = subject, the image's own size; it
takes precedence over an image's alpha) and weights its denoising loss by it (:mod:`trainers.loop`: the
squared error of each instance image is averaged over the mask, at latent resolution), so the photos'
backgrounds stop being part of what the concept learns.

* segmenters (:mod:`studio.dataset.segmenters`): ``grabcut`` (default; offline, classical, for plain
  backgrounds) or CLIPSeg by hub id / folder (``clipseg`` = ``CIDAS/clipseg-rd64-refined``), prompted
  with ``--prompt`` or "a photo of a CLASS_WORD";
* a sidecar that exists is kept (and its image not segmented) unless ``--force``;
* an image with transparency already carries its mask (its alpha) and is skipped unless ``--force``;
* a mask that is empty (< :data:`MIN_COVERAGE` of the pixels) or near-full (> :data:`MAX_COVERAGE`) is
  a warning and is not written unless ``--force`` (the trainers refuse empty masks; a near-full one is
  no mask at all);
* sidecars are written atomically (a crash never leaves half a PNG under the final name).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from studio.dataset.files import MASK_LEVEL, list_folder, mask_path, save_image
from studio.dataset.segmenters import (
    DEFAULT_CLIPSEG,
    NEEDS_PROMPT,
    CLIPSegSegmenter,
    GrabCutSegmenter,
    Segmenter,
    load_segmenter,
)
from studio.errors import DatasetError, StudioError
from studio.images import open_image

__all__ = [
    "CLIPSegSegmenter",
    "GrabCutSegmenter",
    "MaskResult",
    "Segmenter",
    "default_prompt",
    "list_images",
    "load_segmenter",
    "mask_folder",
    "mask_path",
]

HELP = "subject masks (name.mask.png) with GrabCut (offline) or a text-prompted CLIPSeg model"
MIN_COVERAGE = 0.005
"""A mask covering less than this fraction of its image is *empty* (a warning; not written without --force)."""
MAX_COVERAGE = 0.9
"""A mask covering more than this fraction of its image is *near-full* (a warning; not written without --force)."""
BATCH = 8  # images opened and segmented at a time

Status = Literal["written", "kept", "skipped"]


@dataclass(frozen=True)
class MaskResult:
    """What :func:`mask_folder` did for one image.

    Attributes:
        image: the photo.
        mask: its sidecar path (``name.mask.png``), written or not.
        status: ``written``; ``kept`` (a sidecar or an alpha mask was there, and no ``force``: not
            segmented); ``skipped`` (the mask was empty or near-full, and no ``force``: not written).
        coverage: fraction of the image's pixels marked subject (None when not segmented).
        warning: one sentence when the mask is suspect or was not made, else None.
    """

    image: Path
    mask: Path
    status: Status
    coverage: float | None = None
    warning: str | None = None


def list_images(folder: str | Path) -> list[Path]:
    """The photos of ``folder`` by name (:func:`studio.dataset.files.list_folder`: not masks, not hidden);
    two photos whose masks would share a name (``a.png``, ``a.jpg``) are a :class:`DatasetError`."""
    images = list_folder(folder).images
    by_mask: dict[Path, Path] = {}
    for image in images:
        other = by_mask.setdefault(mask_path(image), image)
        if other is not image:
            raise DatasetError(f"{other.name} and {image.name} would share the mask {mask_path(image).name}; "
                               "rename one of them.")
    return images


def default_prompt(class_word: str | None) -> str:
    """CLIPSeg's prompt when none is given: ``"a photo of a dog"`` for class word ``dog`` ("" without one)."""
    if not class_word or not class_word.strip():
        return ""
    word = class_word.strip()
    return f"a photo of {'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _has_transparency(image: Image.Image) -> bool:
    if image.mode != "RGBA":
        return False
    return bool(np.asarray(image.getchannel("A")).min() < 255)


def _judge(coverage: float, name: str) -> str | None:
    if coverage < MIN_COVERAGE:
        return (f"the mask of {name} is empty ({coverage:.1%} of the pixels): the segmenter found no subject; "
                "try another --model or --prompt, or draw the mask yourself")
    if coverage > MAX_COVERAGE:
        return (f"the mask of {name} covers {coverage:.1%} of the image, which is no mask at all; try another "
                "--model or --prompt, or crop the photo")
    return None


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def mask_folder(folder: str | Path, segmenter: Segmenter, *, prompt: str | None = None,
                force: bool = False) -> list[MaskResult]:
    """Write ``name.mask.png`` (mode "L", the image's size, 255 = subject) beside every photo of ``folder``.

    ``prompt`` names the subject for text-prompted segmenters (CLIPSeg); GrabCut ignores it. Existing
    sidecars and transparent images are kept, and empty or near-full masks not written, unless ``force``
    (see the module docstring). Returns one :class:`MaskResult` per photo, in name order. A corrupt photo
    is a :class:`DatasetError` naming it; the masks written before it stay.
    """
    root = Path(folder).expanduser()
    images = list_images(root)
    if not images:
        raise DatasetError(f"{root} holds no images (PNG, JPEG, WebP, BMP or TIFF); put the photos to mask there.")
    results: dict[Path, MaskResult] = {}
    todo: list[Path] = []
    for path in images:
        if mask_path(path).exists() and not force:
            results[path] = MaskResult(path, mask_path(path), "kept")
        else:
            todo.append(path)
    for batch in _batches(todo, BATCH):
        opened = [open_image(p) for p in batch]
        work = []
        for path, image in zip(batch, opened):
            if _has_transparency(image) and not force:
                results[path] = MaskResult(path, mask_path(path), "kept",
                                           warning=f"{path.name} has transparency, which is its mask already; "
                                                   "--force masks it anyway")
            else:
                work.append((path, image))
        if not work:
            continue
        masks = segmenter.segment([image for _, image in work], prompt or "")
        if len(masks) != len(work):
            raise DatasetError(f"The segmenter {segmenter.name} returned {len(masks)} masks for {len(work)} images.")
        for (path, image), mask in zip(work, masks):
            mask = mask.convert("L")
            if mask.size != image.size:
                raise DatasetError(f"The segmenter {segmenter.name} returned a {mask.size} mask for {path.name} "
                                   f"({image.size}).")
            coverage = float((np.asarray(mask) >= MASK_LEVEL).mean())
            warning = _judge(coverage, path.name)
            if warning is not None and not force:
                results[path] = MaskResult(path, mask_path(path), "skipped", coverage,
                                           warning + " (not written; --force writes it)")
                continue
            save_image(mask, mask_path(path))  # atomic
            results[path] = MaskResult(path, mask_path(path), "written", coverage, warning)
    return [results[p] for p in images]


# ----------------------------------------------------------------------------------------------
# CLI: python -m studio dataset mask DIR …
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``DIR``, ``--model``, ``--prompt``, ``--class-word``, ``--force``, ``--device``, ``--dtype``."""
    parser.add_argument("dir", metavar="DIR", help="folder of training photos (the masks are written beside them)")
    parser.add_argument("--model", default="grabcut",
                        help=f"'grabcut' (default: offline, plain backgrounds), 'clipseg' ({DEFAULT_CLIPSEG}), or a "
                             "CLIPSeg hub id or folder")
    parser.add_argument("--prompt", default=None, help="what to segment, for CLIPSeg (e.g. \"the dog\")")
    parser.add_argument("--class-word", default=None,
                        help="the subject's class (dog); CLIPSeg's prompt is then \"a photo of a dog\" unless --prompt")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing masks and write empty or near-full ones")
    parser.add_argument("--device", default=None, help="CLIPSeg's device (default: CUDA, then MPS, then CPU)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                        help="CLIPSeg's dtype (default: fp16 on GPU, fp32 on CPU)")


def run(ns: argparse.Namespace) -> int:
    """Mask ``ns.dir``; prints one line per photo and a summary. 0 on success (warnings included)."""
    prompt = ns.prompt if ns.prompt is not None else default_prompt(ns.class_word)
    if ns.model.strip().lower() != "grabcut" and not prompt.strip():
        raise StudioError(NEEDS_PROMPT)  # before loading a model
    segmenter = load_segmenter(ns.model, device=ns.device, dtype=ns.dtype)
    results = mask_folder(ns.dir, segmenter, prompt=prompt, force=ns.force)
    for r in results:
        if r.status == "written":
            print(f"{r.image.name} → {r.mask.name}  subject {r.coverage:.1%}")
        elif r.status == "kept" and r.warning is None:
            print(f"{r.image.name}: kept {r.mask.name} (exists; --force redoes it)")
        if r.warning is not None:
            print(f"warning: {r.warning}", file=sys.stderr)
    counts = {s: sum(r.status == s for r in results) for s in ("written", "kept", "skipped")}
    print(f"{segmenter.name}: {counts['written']} written, {counts['kept']} kept, {counts['skipped']} skipped "
          f"of {len(results)} photos in {ns.dir}")
    return 0
