"""The dataset every trainer reads: an image folder, validated up front.

* formats: PNG, JPEG, WebP, BMP, TIFF; opened with :func:`studio.images.open_image` (EXIF
  orientation applied, first frame of an animation, at most 8192×8192 pixels — checked from the
  header, so a decompression bomb is refused before it is decoded);
* RGBA alpha → the subject mask; ``name.mask.png`` sidecar → the mask (white = subject);
* ``name.txt`` sidecar → the caption of that image;
* resized (shorter side) and centre-cropped to the training resolution;
* every file is opened and decoded before training starts: a corrupt, unreadable, tiny or
  non-image file is an error naming the file; too few images is an error too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.errors import DatasetError
from studio.images import MAX_PIXELS, open_image  # noqa: F401  (MAX_PIXELS: the limit, re-exported)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
SIDECAR_SUFFIXES = {".txt", ".json", ".md"}
MIN_SIDE = 16  # pixels; smaller files are almost certainly thumbnails or icons


@dataclass
class Example:
    """One training image, prepared at the training resolution.

    pixels: (3, R, R) float32 in [-1, 1]; mask: (1, R, R) float32 in [0, 1] or None.
    """

    path: Path
    pixels: torch.Tensor
    mask: torch.Tensor | None
    caption: str | None


def _is_mask_sidecar(p: Path) -> bool:
    return p.name.lower().endswith(".mask.png")


def load_image_folder(folder: str | os.PathLike[str], resolution: int, *, min_images: int = 1,
                      max_images: int = 1000) -> list[Example]:
    """Validate and load every image of ``folder`` (sorted by name)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} does not exist or is not a folder.")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not _is_mask_sidecar(p)]
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES | SIDECAR_SUFFIXES and not _is_mask_sidecar(p):
            raise DatasetError(f"{p.name} in {root} is not an image (use PNG, JPEG, WebP, BMP or TIFF), "
                               "a caption (.txt) or a mask (.mask.png); move it out of the folder.")
    if len(images) < min_images:
        raise DatasetError(f"{root} holds {len(images)} image(s); this method needs at least {min_images} "
                           "(3–20 photos of the subject work best).")
    if len(images) > max_images:
        raise DatasetError(f"{root} holds {len(images)} images; at most {max_images} are accepted.")
    return [_load_example(p, resolution) for p in images]


def _open(path: Path) -> Image.Image:
    """Decoded, upright, in mode RGB/RGBA/L; too large (:data:`MAX_PIXELS`, checked from the header
    before decoding), corrupt or not an image → a :class:`DatasetError` naming the file."""
    return open_image(path)


def _load_example(path: Path, resolution: int) -> Example:
    img = _open(path)
    if min(img.size) < MIN_SIDE:
        raise DatasetError(f"{path.name} is only {img.width}×{img.height} pixels; use images at least "
                           f"{MIN_SIDE} px on each side (ideally ≥ {resolution}).")
    mask_img: Image.Image | None = None
    sidecar = path.with_name(path.stem + ".mask.png")
    if sidecar.is_file():
        mask_img = _open(sidecar).convert("L")
        if mask_img.size != img.size:
            raise DatasetError(f"{sidecar.name} is {mask_img.size} but {path.name} is {img.size}; a mask must "
                               "have the size of its image.")
    elif img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        mask_img = rgba.getchannel("A")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # composite on white
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    pixels = _to_tensor(_fit(rgb, resolution, Image.Resampling.BICUBIC)) * 2 - 1
    mask = None
    if mask_img is not None:
        mask = _to_tensor(_fit(mask_img, resolution, Image.Resampling.BILINEAR))
        if float(mask.max()) <= 0:
            raise DatasetError(f"The mask of {path.name} is empty (all transparent/black); fix or remove it.")
    caption = None
    cap = path.with_suffix(".txt")
    if cap.is_file():
        try:
            caption = cap.read_text(encoding="utf-8").strip() or None
        except UnicodeDecodeError:
            raise DatasetError(f"{cap.name} is not UTF-8 text; save the caption as UTF-8.") from None
    return Example(path=path, pixels=pixels, mask=mask, caption=caption)


def _fit(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop to ``size × size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))
