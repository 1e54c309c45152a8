"""``dataset crop``: crop each photo around its subject to the training size.

For an image with a mask (its ``name.mask.png`` sidecar, else its alpha channel):

1. the subject box: the bounding box of the mask pixels at or above
   :data:`~studio.dataset.files.MASK_LEVEL` (:func:`subject_box`);
2. padded by ``margin`` × the box's width (left and right) and height (top and bottom);
3. the window: the largest square (or ``aspect``) window the image holds, placed as close to
   centred on the subject as the image allows while containing the padded box — or, when that box
   is larger than the window, the bare box; a subject larger than the window is cut, and the result
   says so (a wider ``--aspect`` keeps it whole);
4. resized to the output size (image: Lanczos; mask: bilinear, as the trainers resize masks).

Without a mask the window is centred on the image (a centre crop), and the result says so. The
output folder receives the cropped images (upright: EXIF orientation applied, so none is written),
their cropped masks and their captions; a GIF, or an image with alpha in a format that cannot keep
it, is written as PNG. Every file is written atomically; nothing is overwritten without ``force``,
and the input folder is only written to with ``--in-place --force``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.dataset import files
from studio.errors import DatasetError
from studio.images import open_image

HELP = "crop each image around its subject (mask sidecar or alpha) to the training size; centre crop without a mask"

MIN_SIZE, MAX_SIZE = 16, 8192  # output side limits, in pixels (the trainers refuse images under 16 px)
MAX_ASPECT = 4.0  # the widest (and, inverted, the tallest) aspect accepted
MAX_MARGIN = 2.0  # margin × the subject box, per side
_KEEPS_ALPHA = {".png", ".webp", ".tif", ".tiff"}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1): x1 and y1 exclusive, as PIL's crop takes them


@dataclass
class CropResult:
    """What happened to one image. ``window`` and ``subject`` are in the upright source image's
    pixels; ``size`` is the output (width, height); ``method`` is "subject", "centre" or "error"."""

    name: str
    method: str
    note: str  # one sentence for the user
    output: Path | None = None
    mask_output: Path | None = None
    caption_output: Path | None = None
    window: Box | None = None
    subject: Box | None = None
    size: tuple[int, int] | None = None


def parse_aspect(aspect: str | float | None) -> float | None:
    """``"W:H"`` (or ``"W/H"``, or a number) → width / height; None stays None (square)."""
    if aspect is None:
        return None
    try:
        if isinstance(aspect, str):
            text = aspect.strip().replace("/", ":")
            w, _, h = text.partition(":")
            value = float(w) / float(h) if h else float(w)
        else:
            value = float(aspect)
    except (ValueError, ZeroDivisionError):
        raise DatasetError(f"--aspect {aspect!r} is not an aspect ratio; write it as W:H, such as 1:1, 3:4 or "
                           "16:9.") from None
    if not math.isfinite(value) or not 1 / MAX_ASPECT <= value <= MAX_ASPECT:
        raise DatasetError(f"--aspect {aspect!r} is outside 1:{MAX_ASPECT:.0f} … {MAX_ASPECT:.0f}:1.")
    return value


def output_size(size: int, aspect: float | None) -> tuple[int, int]:
    """The output (width, height): ``size``×``size`` for a square; for another aspect, about
    ``size``² pixels with both sides multiples of 8 (the VAE's downsampling factor)."""
    if aspect is None or abs(aspect - 1.0) < 1e-9:
        return size, size
    w = max(8, round(size * math.sqrt(aspect) / 8) * 8)
    h = max(8, round(size / math.sqrt(aspect) / 8) * 8)
    return w, h


def subject_box(mask: Image.Image | np.ndarray) -> Box:
    """The bounding box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the subject in ``mask``: a PIL
    image (converted to L) or a (H, W) array — bool, float in [0, 1] (≥ 0.5 is subject) or integer
    0–255 (≥ :data:`~studio.dataset.files.MASK_LEVEL`). An empty mask is a :class:`DatasetError`."""
    arr = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if arr.ndim != 2:
        raise DatasetError(f"A mask must be one channel (H, W); got an array of shape {arr.shape}.")
    if arr.dtype == bool:
        on = arr
    elif np.issubdtype(arr.dtype, np.floating):
        on = arr >= 0.5
    else:
        on = arr >= files.MASK_LEVEL
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        raise DatasetError("The mask is empty: no pixel is subject (white).")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _place(length: int, window: int, lo: int, hi: int, pad: float) -> tuple[int, str]:
    """The start of a ``window`` along an image side of ``length`` containing [lo, hi) (+ ``pad`` on
    each side when it fits), as centred on it as possible; and "" / "margin" / "cut" for what gave way."""
    centre = (lo + hi) / 2
    start = round(centre - window / 2)
    for a, b, gave in ((max(0, math.floor(lo - pad)), min(length, math.ceil(hi + pad)), ""), (lo, hi, "margin")):
        if b - a <= window:
            return min(max(start, b - window, 0), a, length - window), gave
    return min(max(start, 0), length - window), "cut"


def crop_window(image_size: tuple[int, int], aspect: float, subject: Box | None = None,
                margin: float = 0.1) -> tuple[Box, str]:
    """The largest window of ``aspect`` (width / height) inside an image of ``image_size`` = (W, H):
    centred on the image without a ``subject`` box, else containing it (padded by ``margin`` × its
    size) and centred on it as far as the image allows. Returns the window and "" when the padded
    subject fits, "margin" when only the bare subject does, "cut" when the subject is cut."""
    w, h = image_size
    if w / h >= aspect:
        win_w, win_h = min(w, max(1, round(h * aspect))), h
    else:
        win_w, win_h = w, min(h, max(1, round(w / aspect)))
    if subject is None:
        x0, y0 = (w - win_w) // 2, (h - win_h) // 2
        return (x0, y0, x0 + win_w, y0 + win_h), ""
    sx0, sy0, sx1, sy1 = subject
    x0, gave_x = _place(w, win_w, sx0, sx1, margin * (sx1 - sx0))
    y0, gave_y = _place(h, win_h, sy0, sy1, margin * (sy1 - sy0))
    gave = "cut" if "cut" in (gave_x, gave_y) else "margin" if "margin" in (gave_x, gave_y) else ""
    return (x0, y0, x0 + win_w, y0 + win_h), gave


@dataclass
class _Plan:
    source: Path
    output: Path
    mask_source: Path | None
    mask_output: Path | None
    caption_source: Path | None
    caption_output: Path | None


def _plan(listing: files.Listing, out: Path) -> list[_Plan]:
    plans = []
    for path in listing.images:
        suffix = path.suffix.lower()
        target = out / (path.name if suffix in files.TRAINABLE_SUFFIXES else path.stem + ".png")
        mask = files.mask_path(path)
        caption = files.caption_path(path)
        plans.append(_Plan(path, target, mask if mask.is_file() else None,
                           files.mask_path(target) if mask.is_file() else None,
                           caption if caption.is_file() else None,
                           files.caption_path(target) if caption.is_file() else None))
    return plans


def _check_outputs(plans: list[_Plan], *, force: bool) -> None:
    seen: dict[Path, Path] = {}
    existing: list[Path] = []
    for plan in plans:
        for target in (plan.output, plan.mask_output, plan.caption_output):
            if target is None:
                continue
            if target in seen:
                raise DatasetError(f"{seen[target].name} and {plan.source.name} would both be written as "
                                   f"{target.name}; rename one of them.")
            seen[target] = plan.source
            if target.exists():
                existing.append(target)
    if existing and not force:
        names = ", ".join(p.name for p in existing[:3]) + (", …" if len(existing) > 3 else "")
        raise DatasetError(f"{len(existing)} file(s) already exist in {existing[0].parent} ({names}); pass --force "
                           "to replace them, or choose another --out.")


def crop_folder(folder: str | Path, out: str | Path, *, size: int, margin: float = 0.1,
                aspect: str | float | None = None, force: bool = False) -> list[CropResult]:
    """Crop every image of ``folder`` into ``out`` (see the module docstring); one result per image,
    in name order. ``out`` may be ``folder`` itself only with ``force``. Raises :class:`DatasetError`
    before writing anything when the settings are invalid or files would be overwritten without
    ``force``; an image that cannot be read becomes an "error" result and the others are cropped."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DatasetError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}.")
    if not (math.isfinite(margin) and 0 <= margin <= MAX_MARGIN):
        raise DatasetError(f"--margin must be between 0 and {MAX_MARGIN:g} (a fraction of the subject's size), "
                           f"not {margin}.")
    ratio = parse_aspect(aspect)
    out_w, out_h = output_size(size, ratio)
    listing = files.list_folder(folder)
    target = Path(out).expanduser()
    if target.exists() and not target.is_dir():
        raise DatasetError(f"--out {target} is a file; give a folder.")
    if target.resolve() == listing.folder.resolve() and not force:
        raise DatasetError(f"--out is the input folder {listing.folder}: cropping in place replaces your photos; "
                           "pass --in-place --force to do that, or choose another --out.")
    plans = _plan(listing, target)
    _check_outputs(plans, force=force)
    return [_crop_one(plan, (out_w, out_h), margin, force=force) for plan in plans]


def _crop_one(plan: _Plan, out_size: tuple[int, int], margin: float, *, force: bool) -> CropResult:
    name = plan.source.name
    try:
        img = open_image(plan.source)
        with Image.open(plan.source) as probe:
            source_mode = probe.mode
        mask: Image.Image | None = None
        if plan.mask_source is not None:
            mask = open_image(plan.mask_source).convert("L")
            if mask.size != img.size:
                raise DatasetError(f"{plan.mask_source.name} is {mask.width}×{mask.height} but {name} is "
                                   f"{img.width}×{img.height}: a mask must have the size of its image; fix or remove it.")
    except DatasetError as err:
        message = files.without_folder(str(err), plan.source)
        if plan.mask_source is not None:
            message = files.without_folder(message, plan.mask_source)
        return CropResult(name, "error", message)
    except (OSError, MemoryError) as err:
        return CropResult(name, "error", f"{name} cannot be read ({err}); replace or remove it.")
    aspect = out_size[0] / out_size[1]
    source = mask if mask is not None else img.getchannel("A") if img.mode == "RGBA" else None
    where = plan.mask_source.name if mask is not None and plan.mask_source is not None else "its alpha"
    subject: Box | None = None
    note = ""
    if source is None:
        note = f"no mask ({files.mask_path(plan.source).name} or alpha): centre crop"
    elif source is not mask and np.asarray(source).min() == 255:
        note = "its alpha has no transparent pixel, so it names no subject: centre crop"
    else:
        try:
            subject = subject_box(source)
        except DatasetError:
            note = f"the mask ({where}) is empty: centre crop; training refuses an empty mask — fix or remove it"
    window, gave = crop_window(img.size, aspect, subject, margin)
    win_w, win_h = window[2] - window[0], window[3] - window[1]
    if subject is not None:
        sx0, sy0, sx1, sy1 = subject
        note = f"subject crop from {where}: subject {sx1 - sx0}×{sy1 - sy0} at ({sx0}, {sy0}), window {win_w}×{win_h} " \
               f"at ({window[0]}, {window[1]})"
        if gave == "margin":
            note += f"; the {margin:g} margin did not fit in full"
        elif gave == "cut":
            note += "; the subject is larger than the window and was cut (a wider or taller --aspect keeps it whole)"
    if win_w < out_size[0]:
        note += f"; upscaled ×{out_size[0] / win_w:.2f} (the window is smaller than the output)"
    resample = Image.Resampling.LANCZOS
    cropped = img.crop(window).resize(out_size, resample, reducing_gap=3.0)
    output = plan.output
    if cropped.mode == "RGBA" and output.suffix.lower() not in _KEEPS_ALPHA:  # a BMP with alpha
        output = output.with_suffix(".png")
        if output.exists() and not force:
            return CropResult(name, "error", f"{name} has an alpha channel, so its crop is written as {output.name}, "
                                             "which already exists; pass --force to replace it.")
    params: dict[str, Any] = {}
    icc = img.info.get("icc_profile")
    if icc and source_mode not in ("CMYK", "YCbCr", "LAB", "HSV"):
        params["icc_profile"] = icc
    files.save_image(cropped, output, **params)
    mask_output = None
    if mask is not None and plan.mask_output is not None:
        mask_output = plan.mask_output
        files.save_image(mask.crop(window).resize(out_size, Image.Resampling.BILINEAR), mask_output)
    caption_output = None
    if plan.caption_source is not None and plan.caption_output is not None:
        caption_output = plan.caption_output
        if caption_output.resolve() != plan.caption_source.resolve():
            files.copy_file(plan.caption_source, caption_output)
    return CropResult(name, "subject" if subject is not None else "centre", note[0].upper() + note[1:] + ".",
                      output=output, mask_output=mask_output, caption_output=caption_output, window=window,
                      subject=subject, size=out_size)


# -- CLI -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dataset crop DIR (--out DIR2 | --in-place --force) [--size 512] [--margin 0.1] [--aspect 1:1] [--force]``."""
    parser.add_argument("folder", metavar="DIR", help="the folder of photos")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR2", help="the folder to write the cropped images, masks and captions to")
    where.add_argument("--in-place", action="store_true", help="replace the photos of DIR by their crops (needs "
                       "--force)")
    parser.add_argument("--size", type=int, default=512, help="the output side in pixels (default 512); with --aspect, "
                        "about size² pixels, sides multiples of 8")
    parser.add_argument("--margin", type=float, default=0.1, help="room kept around the subject, as a fraction of "
                        "its box on each side (default 0.1)")
    parser.add_argument("--aspect", default=None, metavar="W:H", help="the output aspect ratio (default 1:1)")
    parser.add_argument("--force", action="store_true", help="replace files that exist in the output folder")


def run(ns: argparse.Namespace) -> int:
    """Crop the folder and print one line per image; 1 when an image could not be cropped."""
    if ns.in_place and not ns.force:
        raise DatasetError("--in-place replaces your photos by their crops; add --force to confirm.")
    if ns.out is not None and Path(ns.out).expanduser().resolve() == Path(ns.folder).expanduser().resolve():
        raise DatasetError("--out is the input folder: cropping in place replaces your photos; pass --in-place "
                           "--force to do that, or choose another --out.")
    out = ns.folder if ns.in_place else ns.out
    results = crop_folder(ns.folder, out, size=ns.size, margin=ns.margin, aspect=ns.aspect, force=ns.force)
    for r in results:
        print(f"{r.name}: {r.note}")
    done = [r for r in results if r.method != "error"]
    if done and done[0].size is not None:
        w, h = done[0].size
        subjects = sum(r.method == "subject" for r in done)
        print(f"\nCropped {len(done)} image(s) to {w}×{h} in {Path(out).expanduser()} ({subjects} around their "
              f"subject, {len(done) - subjects} centre crop(s)).")
    failed = len(results) - len(done)
    if failed:
        print(f"{failed} image(s) could not be cropped (see above).")
    elif not results:
        print(f"No images in {ns.folder}.")
    return 1 if failed else 0
