"""``dataset inspect``: what is in a folder of photos, and what will go wrong when training on it.

For each image: size, aspect, megapixels, mode and bit depth, EXIF orientation, sharpness (variance
of the Laplacian), a 64-bit perceptual hash, and whether it has a mask sidecar, a caption sidecar or
an alpha channel. Then warnings, aggregated into sentences: small images, near-duplicates, blurry
images, conversions (CMYK, 16-bit, animated, palette transparency, EXIF rotation), mask problems,
sidecars that belong to no image, and every file that cannot be used with its reason. A bad file
never stops the inspection: it becomes an error entry of the report.

Output: :meth:`Report.to_dict` (JSON), :meth:`Report.text` (a table and the warnings) and
:meth:`Report.contact_sheet` (thumbnails with a warning badge per image).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from studio.dataset import files
from studio.errors import DatasetError
from studio.images import open_image

HELP = "report size, blur, near-duplicates, EXIF orientation and sidecars of each image, with warnings"

SHARPNESS_SIDE = 512
"""Sharpness is measured on a greyscale copy resized so that its longer side is this many pixels.
The variance of the Laplacian grows with the detail per pixel, so the same photo measured at 4000 px
and at 800 px gives very different values; at one fixed size the numbers compare across cameras and
resolutions (and describe the image at about the size it trains at). A smaller image is upscaled
first, so a tiny image also reads as blurry — which it will be at the training resolution."""

BLUR_THRESHOLD = 40.0
"""An image whose sharpness (variance of the Laplacian at :data:`SHARPNESS_SIDE`) is below this is
called blurry. Measured on 40 sample images shipped with scikit-image, gradio and matplotlib
(photos, scans, drawings): in-focus photos score 65–5300, most 150–1700; the same images blurred
with a Gaussian of radius 2 (at 512 px) score 1–19, of radius 1 score 2–215; a motion-blurred photo
scores 10. Featureless images (a smooth gradient, a microscope cell) score under 5 even in focus,
and are flagged too — check a flagged image by eye. 40 flags clearly soft shots with margin on both
sides."""

HASH_BITS = 64
DUPLICATE_DISTANCE = 10
"""Two images whose 64-bit perceptual hashes (pHash: the signs of the 8×8 lowest frequencies of a
32×32 DCT, against their median) differ in at most this many bits are near-duplicates. Measured on
the same 40 images: re-saved as JPEG (quality 60) at 2/3 of the size, 0–2 bits (one line drawing
18); 20 % brighter, 0–10; blurred (radius 2), 0–4; mirrored, 26–34; a 5 % crop on every side,
4–26 (mostly over 10: a crop is a different framing); pairs of different images, 16 or more
(median 32), except a stereo pair (6) and two renderings of one drawing (8). 10 catches re-saved,
resized and re-exposed copies and burst shots, not different views of one subject."""

THUMB_SIDE = 128  # pixels: the longer side of the thumbnails kept for the contact sheet

_ORIENTATION = {2: "mirrored", 3: "rotated 180°", 4: "flipped upside down", 5: "mirrored and rotated 90°",
                6: "rotated 90° clockwise", 7: "mirrored and rotated 90°", 8: "rotated 90° counter-clockwise"}
_CONVERTED_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV"}


@dataclass
class ImageInfo:
    """One readable image. ``width``/``height`` are upright (after the EXIF orientation)."""

    name: str
    width: int
    height: int
    aspect: float  # width / height
    megapixels: float
    format: str
    mode: str  # the file's PIL mode before normalisation ("CMYK", "I;16", "P", "RGB", ...)
    bit_depth: int  # bits per channel in the file (8, 16, 1, 32)
    frames: int
    orientation: int | None  # the EXIF orientation tag (1 = upright); open_image applies it
    orientation_applied: bool
    sharpness: float  # variance of the Laplacian at SHARPNESS_SIDE
    phash: str  # 16 hex digits
    has_mask: bool  # a name.mask.png sidecar
    has_caption: bool  # a name.txt sidecar
    has_alpha: bool  # an alpha channel (or palette transparency) once decoded
    mask_coverage: float | None  # the subject's share of the image, from the sidecar or the alpha
    flags: list[str] = field(default_factory=list)  # short codes for the table and the contact sheet
    thumbnail: Image.Image | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no thumbnail)."""
        d = asdict(self)
        d.pop("thumbnail")
        return d


@dataclass
class FileProblem:
    """A file that cannot be used, and why (one sentence naming it)."""

    name: str
    reason: str


@dataclass
class Report:
    """What :func:`inspect_folder` found."""

    folder: Path
    resolution: int
    images: list[ImageInfo]
    errors: list[FileProblem]
    near_duplicates: list[list[str]]  # groups of image names, each sorted
    warnings: list[str]
    blur_threshold: float = BLUR_THRESHOLD
    duplicate_distance: int = DUPLICATE_DISTANCE

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {"folder": str(self.folder), "resolution": self.resolution,
                "thresholds": {"blur": self.blur_threshold, "sharpness_side": SHARPNESS_SIDE,
                               "duplicate_distance": self.duplicate_distance, "hash_bits": HASH_BITS},
                "images": [i.to_dict() for i in self.images],
                "errors": [asdict(e) for e in self.errors],
                "near_duplicates": self.near_duplicates, "warnings": self.warnings}

    def text(self) -> str:
        """A table of the images, then the warnings, as plain text."""
        head = ("name", "size", "aspect", "MP", "mode", "exif", "sharp", "phash", "mask", "txt", "alpha", "flags")
        rows = [head] + [(_short(i.name), f"{i.width}×{i.height}", f"{i.aspect:.2f}", f"{i.megapixels:.2f}",
                          f"{i.mode}/{i.bit_depth}", "-" if i.orientation is None else str(i.orientation),
                          f"{i.sharpness:.0f}", i.phash, _yes(i.has_mask), _yes(i.has_caption), _yes(i.has_alpha),
                          ",".join(i.flags)) for i in self.images]
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = [f"{self.folder}: {len(self.images)} image(s), {len(self.errors)} unusable file(s)", ""]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines += ["", "Warnings:" if self.warnings else "No warnings."]
        lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines)

    def contact_sheet(self, *, columns: int | None = None) -> Image.Image:
        """Thumbnails of every image (and a tile per unusable file), each with a warning badge (RGB)."""
        from studio.dataset.sheet import Tile, draw_sheet

        tiles = [Tile(i.name, i.thumbnail, i.flags, error=False) for i in self.images]
        tiles += [Tile(e.name, None, ["error"], error=True) for e in self.errors]
        return draw_sheet(tiles, side=THUMB_SIDE, columns=columns)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- measurements --------------------------------------------------------------------------------------

def grey_at(img: Image.Image, side: int = SHARPNESS_SIDE) -> np.ndarray:
    """``img`` (any mode; alpha composited on white, as the trainers do) as a (H, W) uint8 greyscale
    array whose longer side is ``side`` pixels."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    grey = np.asarray(img.convert("L"))
    h, w = grey.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian of a (H, W) uint8 greyscale array (see :data:`SHARPNESS_SIDE`)."""
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(grey: np.ndarray) -> int:
    """64-bit pHash of a (H, W) uint8 greyscale array: resized to 32×32, 2-D DCT, the 8×8 lowest
    frequencies compared with their median (the constant term left out of the median)."""
    small = np.asarray(Image.fromarray(grey).resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ small @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """The number of bits in which two hashes differ."""
    return bin(a ^ b).count("1")


def duplicate_groups(hashes: dict[str, int], max_distance: int = DUPLICATE_DISTANCE) -> list[list[str]]:
    """Groups (connected components) of names whose hashes differ in at most ``max_distance`` bits;
    groups of one are left out. Each group is sorted, the groups by their first name."""
    names = list(hashes)
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    values = [hashes[n] for n in names]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if hamming(values[i], values[j]) <= max_distance:
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _bit_depth(im: Image.Image) -> int:
    """Bits per channel in the file (read from the header, before decoding)."""
    if im.mode == "1":
        return 1
    if im.mode.startswith("I;16"):
        return 16
    if im.mode in ("I", "F"):
        return 32
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if bits:
        return int(max(bits) if isinstance(bits, tuple) else bits)
    for tile in getattr(im, "tile", [])[:1]:  # an ImageFile's undecoded tiles
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:  # a 48/64-bit PNG decodes to 8 bits per channel
            return 16
    return 8


def _mask_coverage(path: Path, img: Image.Image, sink: list[str]) -> tuple[bool, float | None]:
    """(has a mask sidecar, the subject's share from the sidecar or the alpha); problems go to ``sink``."""
    sidecar = files.mask_path(path)
    if sidecar.is_file():
        try:
            mask = open_image(sidecar).convert("L")
        except DatasetError as err:
            sink.append(files.without_folder(str(err), sidecar))
            return True, None
        if mask.size != img.size:
            sink.append(f"{sidecar.name} is {mask.width}×{mask.height} but {path.name} is {img.width}×{img.height}: "
                        "a mask must have the size of its image.")
            return True, None
        coverage = float((np.asarray(mask) >= files.MASK_LEVEL).mean())
        if not np.asarray(mask).any():
            sink.append(f"The mask {sidecar.name} is empty (all black): training refuses it; fix or remove it.")
        return True, coverage
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"))
        if not alpha.any():
            sink.append(f"{path.name} is fully transparent: its mask (the alpha) is empty and training refuses it.")
        elif alpha.min() == 255:
            sink.append(f"{path.name} has an alpha channel without a transparent pixel: the trainers take the whole "
                        "image as the subject.")
        return False, float((alpha >= files.MASK_LEVEL).mean())
    return False, None


def inspect_image(path: Path) -> tuple[ImageInfo, list[str]]:
    """Measure one image; returns its info and the sentences it contributes to the report's warnings.
    Raises :class:`DatasetError` (one line naming the file) for a file that cannot be used."""
    img = open_image(path)  # size limit, corruption check, EXIF orientation, first frame, modes
    try:
        with Image.open(path) as im:
            fmt, mode, bits = im.format or path.suffix.lstrip(".").upper(), im.mode, _bit_depth(im)
            frames = int(getattr(im, "n_frames", 1))
            transparency = mode == "P" and "transparency" in im.info
            orientation = im.getexif().get(0x0112)
    except Exception as err:  # noqa: BLE001 — open_image read it; metadata it cannot give is not fatal
        raise DatasetError(f"{path.name}: its header cannot be read ({err}); re-save the image.") from None
    orientation = int(orientation) if isinstance(orientation, int) else None
    notes: list[str] = []
    flags: list[str] = []
    if mode in _CONVERTED_TO_RGB:
        notes.append(f"{path.name} is {mode}: converted to RGB.")
        flags.append("converted")
    elif transparency:
        notes.append(f"{path.name} is a palette image with transparency: converted to RGBA (the transparency is "
                     "its subject mask).")
        flags.append("converted")
    if bits > 8:
        notes.append(f"{path.name} is {bits}-bit: reduced to 8-bit.")
        flags.append("converted")
    if frames > 1:
        notes.append(f"{path.name} is animated: its first frame is used ({frames} frames).")
        flags.append("animated")
    if orientation not in (None, 1):
        what = _ORIENTATION.get(orientation, "transformed")
        notes.append(f"{path.name} has EXIF orientation {orientation}: turned upright ({what}).")
        flags.append("rotated")
    if path.suffix.lower() not in files.TRAINABLE_SUFFIXES:
        notes.append(f"{path.name}: the trainers do not read {path.suffix.lower()} files; `python -m studio dataset "
                     "crop` writes it as PNG, or convert it and move the original out.")
        flags.append("format")
    mask_notes: list[str] = []
    has_mask, coverage = _mask_coverage(path, img, mask_notes)
    if mask_notes:
        notes += mask_notes
        flags.append("mask")
    caption = files.caption_path(path)
    has_caption = caption.is_file()
    if has_caption:
        try:
            caption.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            notes.append(f"{caption.name} is not UTF-8 text: save the caption as UTF-8.")
            flags.append("caption")
        except OSError as err:
            notes.append(f"{caption.name} cannot be read ({err.strerror or err}).")
            flags.append("caption")
    grey = grey_at(img)
    w, h = img.size
    thumb = img.convert("RGBA") if img.mode == "RGBA" else img.convert("RGB")
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    info = ImageInfo(name=path.name, width=w, height=h, aspect=round(w / h, 4), megapixels=round(w * h / 1e6, 3),
                     format=fmt, mode=mode, bit_depth=bits, frames=frames, orientation=orientation,
                     orientation_applied=orientation not in (None, 1), sharpness=round(sharpness(grey), 2),
                     phash=f"{perceptual_hash(grey):016x}", has_mask=has_mask, has_caption=has_caption,
                     has_alpha=img.mode == "RGBA", mask_coverage=None if coverage is None else round(coverage, 4),
                     flags=flags, thumbnail=thumb)
    return info, notes


def inspect_folder(folder: str | Path, *, resolution: int = 512, blur_threshold: float = BLUR_THRESHOLD,
                   duplicate_distance: int = DUPLICATE_DISTANCE) -> Report:
    """Inspect every image of ``folder`` (not recursive). Images whose shorter side is under
    ``resolution`` pixels are reported as small. Only a missing folder raises; every unusable file
    is an error entry of the report."""
    listing = files.list_folder(folder)
    images: list[ImageInfo] = []
    errors: list[FileProblem] = []
    per_image: list[str] = []
    for path in listing.images:
        try:
            info, notes = inspect_image(path)
        except DatasetError as err:
            errors.append(FileProblem(path.name, files.without_folder(str(err), path)))
            continue
        except MemoryError:
            errors.append(FileProblem(path.name, f"{path.name} is too large to decode in memory; resize it."))
            continue
        images.append(info)
        per_image += notes
    for path in listing.others:
        errors.append(FileProblem(path.name, f"{path.name} is not an image the trainers read (PNG, JPEG, WebP, BMP, "
                                             "TIFF), a caption (.txt) or a mask (.mask.png): move it out of the folder."))
    groups = duplicate_groups({i.name: int(i.phash, 16) for i in images}, duplicate_distance)
    small = [i for i in images if min(i.width, i.height) < resolution]
    blurry = [i for i in images if i.sharpness < blur_threshold]
    for i in small:
        i.flags.insert(0, "small")
    for i in blurry:
        i.flags.insert(0, "blurry")
    grouped = {n for g in groups for n in g}
    for i in images:
        if i.name in grouped:
            i.flags.insert(0, "duplicate")
    warnings: list[str] = []
    if not images:
        warnings.append(f"{listing.folder} holds no readable image (PNG, JPEG, WebP, BMP, TIFF).")
    if small:
        listed = ", ".join(f"{i.name} ({i.width}×{i.height})" for i in small)
        warnings.append(f"{_plural(len(small), 'image')} under {resolution} px: {listed}; they are upscaled for "
                        f"training — use photos at least {resolution} px on the shorter side.")
    if groups:
        listed = "; ".join(" ≈ ".join(g) for g in groups)
        warnings.append(f"{len(grouped)} near-duplicates: {listed} (hashes within {duplicate_distance} bits); keep one "
                        "of each group.")
    if blurry:
        listed = ", ".join(f"{i.name} (sharpness {i.sharpness:.0f} < {blur_threshold:.0f})" for i in blurry)
        warnings.append(f"{_plural(len(blurry), 'blurry image')}: {listed}; retake or remove "
                        f"{'it' if len(blurry) == 1 else 'them'}.")
    warnings += per_image
    for cap in listing.orphan_captions():
        warnings.append(f"{cap.name} is the caption of no image (no {cap.stem}.png, .jpg, …): the trainers ignore it.")
    for mask in listing.orphan_masks():
        warnings.append(f"{mask.name} is the mask of no image: the trainers ignore it.")
    warnings += [e.reason for e in errors]
    return Report(folder=listing.folder, resolution=resolution, images=images, errors=errors, near_duplicates=groups,
                  warnings=warnings, blur_threshold=blur_threshold, duplicate_distance=duplicate_distance)


# -- CLI -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``dataset inspect DIR [--resolution N] [--json] [--sheet OUT.png] [--force]``."""
    parser.add_argument("folder", metavar="DIR", help="the folder of photos")
    parser.add_argument("--resolution", type=int, default=512, help="the training resolution: images whose shorter "
                        "side is under it are reported (default 512)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--sheet", metavar="OUT.png", help="also write a contact sheet (thumbnails with warning badges)")
    parser.add_argument("--force", action="store_true", help="replace an existing --sheet file")


def run(ns: argparse.Namespace) -> int:
    """Print the report (and write the contact sheet); 0 when the folder could be inspected."""
    if ns.resolution < 1:
        raise DatasetError(f"--resolution must be a positive number of pixels, not {ns.resolution}.")
    sheet = Path(ns.sheet).expanduser() if ns.sheet else None
    if sheet is not None:
        files.check_output_image(sheet, force=ns.force)
    report = inspect_folder(ns.folder, resolution=ns.resolution)
    if sheet is not None:
        files.save_image(report.contact_sheet(), sheet)
    if ns.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(report.text())
        if sheet is not None:
            print(f"\nContact sheet: {sheet}")
    return 0
